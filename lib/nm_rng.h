// nm_rng.h — a small deterministic random generator (splitmix64 + Box–Muller), identical on
// every platform, for seeded model init and synthetic data.
#ifndef NM_RNG_H
#define NM_RNG_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t s;
    int has_spare;
    double spare;
} nm_rng;

static inline void nm_rng_seed(nm_rng *r, uint64_t seed) {
    r->s = seed;
    r->has_spare = 0;
    r->spare = 0;
}

static inline uint64_t nm_rng_next(nm_rng *r) {
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// Uniform in (0, 1): never exactly 0, so log() is safe.
static inline double nm_rng_uniform(nm_rng *r) { return ((double)(nm_rng_next(r) >> 11) + 0.5) * 0x1.0p-53; }

static inline double nm_rng_normal(nm_rng *r) {
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    double u1 = nm_rng_uniform(r), u2 = nm_rng_uniform(r);
    double rad = sqrt(-2.0 * log(u1)), th = 6.283185307179586 * u2;
    r->spare = rad * sin(th);
    r->has_spare = 1;
    return rad * cos(th);
}

// FNV-1a, 64 bit, continuing from h over n bytes. Callers pass their own starting value: the
// ones in use (nm_hash_str's, the data set's, the batch key's) are fixed by files already
// written (model inits, data sets, traces), so they stay as they are.
static inline uint64_t nm_fnv1a64(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

// FNV-1a: a stable hash of a tensor name, mixed into the seed.
static inline uint64_t nm_hash_str(const char *s) { return nm_fnv1a64(1469598103934665603ULL, s, strlen(s)); }

#endif
