// nm_simd.h — internal, not part of the API: run-time choice of the vector instruction set
// and the small vector helpers shared by nm_ops.c, nm_moe.c and nm_engine.c.
//
// x86-64 builds carry AVX-512F and AVX2+FMA versions of the hot loops next to portable C;
// nm_isa() picks one per process from CPUID. NM_ISA=generic|avx2|avx512 in the environment
// caps the choice (to run the tests on every path). Results are deterministic for a given
// path; different paths agree to float rounding.
#ifndef NM_SIMD_H
#define NM_SIMD_H

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(NM_NO_SIMD)
#include <immintrin.h>
#define NM_X86 1
#endif

enum { NM_ISA_GENERIC = 0, NM_ISA_AVX2 = 1, NM_ISA_AVX512 = 2 };

static inline int nm_isa(void) {
    static int isa = -1; // benign race: every thread computes the same value
    if (isa >= 0) return isa;
    int v = NM_ISA_GENERIC;
#ifdef NM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) v = NM_ISA_AVX2;
    if (__builtin_cpu_supports("avx512f")) v = NM_ISA_AVX512;
#endif
    const char *cap = getenv("NM_ISA");
    if (cap && !strcmp(cap, "generic")) v = NM_ISA_GENERIC;
    else if (cap && !strcmp(cap, "avx2") && v > NM_ISA_AVX2) v = NM_ISA_AVX2;
    isa = v;
    return v;
}

#ifdef NM_X86
#define NM_AVX512 __attribute__((target("avx512f,fma")))
#define NM_AVX2 __attribute__((target("avx2,fma")))
#define NM_INLINE __attribute__((always_inline)) static inline

// exp(x) in float with Cephes' expf polynomial (about 1 ulp). Inputs below -87.3 (and -inf)
// give exactly 0; NaN stays NaN; large inputs saturate at exp(88.7) (AVX2: exp(88)).
NM_INLINE NM_AVX512 __m512 nm_exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
    x = _mm512_max_ps(lo, _mm512_min_ps(_mm512_set1_ps(88.7f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

NM_INLINE NM_AVX2 __m256 nm_exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 keep = _mm256_cmp_ps(x, lo, _CMP_NLT_UQ);
    x = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(88.0f), x)); // 2^n below needs n <= 127
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n through the exponent bits (n in -126..127 after the clamp)
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(keep, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Lanes 0 .. left-1 set (left <= 8).
NM_INLINE NM_AVX2 __m256i nm_mask256(size_t left) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), idx);
}

NM_INLINE NM_AVX512 __mmask16 nm_mask512(size_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

// Sum of the 16 lanes in double, in a fixed order.
NM_INLINE NM_AVX512 __m512d nm_widen_add512(__m512d acc, __m512 v) {
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    return _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

NM_INLINE NM_AVX512 double nm_hsum512d(__m512d v) {
    double t[8];
    _mm512_storeu_pd(t, v);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// r[i] becomes column i of the 16x16 block r.
NM_INLINE NM_AVX512 void nm_transpose16(__m512 *r) {
    __m512 t[16];
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++) {
        t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        r[4 * q] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
        t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);
        t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
        t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xdd);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}
#endif

#endif
