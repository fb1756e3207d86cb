// test_engine.c — engine properties that the fixtures do not pin down: prefill equals
// token-by-token decoding, tracing changes no value, generation traces every token.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_engine.h"
#include "nm_generate.h"
#include "nm_model.h"
#include "nm_tokenizer.h"
#include "test_util.h"

static nm_config small_config(int vision, int M, int Hs) {
    nm_config c;
    nm_config_init_byte(&c);
    c.hidden_size = 48;
    c.num_layers = 3;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 12;
    c.vocab_size = 262;
    c.max_positions = 200;
    c.moe = (nm_moe_config){.num_experts = 6, .null_copies = M, .top_k = 4, .expert_hidden = 20,
                            .shared_expert_hidden = Hs, .null_kind = NM_NULL_ZERO};
    c.has_vision = vision;
    c.image_size = vision ? 16 : 0;
    c.patch_size = vision ? 4 : 0;
    c.channels = 3;
    return c;
}

static void random_tokens(nm_test_rng *r, int32_t *ids, int T) {
    for (int t = 0; t < T; t++) ids[t] = (int32_t)(nm_test_rng_next(r) % 256);
}

// Prefill of T tokens in one batch == feeding them one by one through the KV cache.
START_TEST(test_prefill_equals_decode) {
    nm_config c = small_config(0, 6, 16);
    nm_model m;
    nm_error err;
    ck_assert_int_eq(nm_model_init_random(&m, &c, 11, &err), NM_OK);
    enum { T = 40 };
    const int V = c.vocab_size, L = c.num_layers, K = c.moe.top_k;
    int32_t ids[T], patch[T];
    nm_test_rng r = {5};
    random_tokens(&r, ids, T);
    for (int t = 0; t < T; t++) patch[t] = -1;
    float *a = malloc((size_t)T * V * sizeof *a), *b = malloc((size_t)T * V * sizeof *b);
    nm_engine *e;
    nm_trace_sample ta, tb;
    ck_assert_int_eq(nm_engine_create(&e, &m, T, &err), NM_OK);
    ck_assert_int_eq(nm_trace_sample_init(&ta, L, K, T, &err), NM_OK);
    ck_assert_int_eq(nm_trace_sample_init(&tb, L, K, T, &err), NM_OK);
    ck_assert_int_eq(nm_engine_forward(e, ids, patch, NULL, T, a, 1, &ta, &err), NM_OK);
    nm_engine_reset(e);
    for (int t = 0; t < T; t++) ck_assert_int_eq(nm_engine_forward(e, ids + t, patch + t, NULL, 1, b + (size_t)t * V, 1, &tb, &err), NM_OK);
    double maxd = 0;
    for (size_t i = 0; i < (size_t)T * V; i++) maxd = fmax(maxd, fabs(a[i] - b[i]) / fmax(1.0, fabs(a[i])));
    ck_assert_msg(maxd < 1e-4, "prefill vs decode logits differ by %g", maxd);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < T; t++) ck_assert_int_eq(ta.n_real[l * T + t], tb.n_real[l * T + t]);
    // a sequence longer than the engine is refused, not overrun
    ck_assert_int_eq(nm_engine_forward(e, ids, patch, NULL, 1, NULL, 0, NULL, &err), NM_ERR_LIMIT);
    nm_trace_sample_free(&ta);
    nm_trace_sample_free(&tb);
    nm_engine_free(e);
    free(a);
    free(b);
    nm_model_free(&m);
}
END_TEST

// Tracing must not change any computed value: logits bit-identical with and without.
START_TEST(test_trace_changes_nothing) {
    nm_config c = small_config(1, 6, 0);
    nm_model m;
    nm_error err;
    ck_assert_int_eq(nm_model_init_random(&m, &c, 3, &err), NM_OK);
    nm_sequence seq;
    ck_assert_int_eq(nm_sequence_build(&seq, &c, "What is in the picture?", 1, 0, &err), NM_OK);
    float pixels[3 * 16 * 16];
    nm_test_rng r = {9};
    for (int i = 0; i < 3 * 16 * 16; i++) pixels[i] = (float)(2 * nm_test_rng_uniform(&r) - 1);
    const int T = seq.n, V = c.vocab_size;
    float *a = malloc((size_t)T * V * sizeof *a), *b = malloc((size_t)T * V * sizeof *b);
    nm_engine *e;
    nm_trace_sample tr;
    ck_assert_int_eq(nm_engine_create(&e, &m, T, &err), NM_OK);
    ck_assert_int_eq(nm_trace_sample_init(&tr, c.num_layers, c.moe.top_k, T, &err), NM_OK);
    ck_assert_int_eq(nm_engine_forward(e, seq.id, seq.patch, pixels, T, a, 1, NULL, &err), NM_OK);
    nm_engine_reset(e);
    ck_assert_int_eq(nm_engine_forward(e, seq.id, seq.patch, pixels, T, b, 1, &tr, &err), NM_OK);
    ck_assert(memcmp(a, b, (size_t)T * V * sizeof *a) == 0);
    // the image matters: other pixels, other logits
    pixels[0] = -pixels[0] + 0.5f;
    for (int i = 0; i < 3 * 16 * 16; i += 7) pixels[i] = -pixels[i];
    nm_engine_reset(e);
    ck_assert_int_eq(nm_engine_forward(e, seq.id, seq.patch, pixels, T, b, 1, NULL, &err), NM_OK);
    ck_assert(memcmp(a, b, (size_t)T * V * sizeof *a) != 0);
    nm_trace_sample_free(&tr);
    nm_engine_free(e);
    nm_sequence_free(&seq);
    free(a);
    free(b);
    nm_model_free(&m);
}
END_TEST

// nm_generate: one trace record per token, generated ones included; layout and codes.
START_TEST(test_generate_trace_complete) {
    nm_config c = small_config(0, 6, 0);
    nm_model m;
    nm_error err;
    ck_assert_int_eq(nm_model_init_random(&m, &c, 21, &err), NM_OK);
    nm_engine *e = NULL;
    for (int max_new = 0; max_new <= 6; max_new += 3) {
        nm_trace_sample tr;
        nm_request req = {.prompt = "héllo", .image_path = NULL, .max_new_tokens = max_new};
        ck_assert_msg(nm_generate(&m, &e, &req, &tr, &err) == NM_OK, "%s", err.msg);
        const int plen = 1 + (int)strlen("héllo");
        ck_assert_int_eq(tr.n_prompt_tokens, plen);
        int gen = tr.n_tokens - plen;
        ck_assert(gen >= (max_new > 0 ? 1 : 0) && gen <= max_new);
        if (gen < max_new) ck_assert_int_eq(tr.token_id[tr.n_tokens - 1], c.tok.eos); // stopped at EOS
        ck_assert_int_eq(tr.token_id[0], c.tok.bos);
        ck_assert_int_eq(tr.segment[0], NM_SEG_BOS);
        ck_assert_int_eq(tr.modality[0], NM_MOD_SPECIAL);
        ck_assert_str_eq(tr.token_text[0], "<bos>");
        ck_assert_str_eq(tr.token_text[2], "é"); // 2-byte character on its lead byte…
        ck_assert_str_eq(tr.token_text[3], "");  // …and nothing on its continuation byte
        for (int t = 1; t < tr.n_tokens; t++) {
            ck_assert_int_eq(tr.segment[t], t < plen ? NM_SEG_PROMPT : NM_SEG_ANSWER);
            ck_assert_ptr_nonnull(tr.token_text[t]);
            ck_assert_int_eq(tr.patch[2 * t], -1);
        }
        for (int l = 0; l < c.num_layers; l++)
            for (int t = 0; t < tr.n_tokens; t++) {
                int nr = 0;
                for (int k = 0; k < c.moe.top_k; k++) {
                    int s = tr.slot[((size_t)l * tr.capacity + t) * c.moe.top_k + k];
                    ck_assert(s >= -1 && s < c.moe.num_experts);
                    nr += s >= 0;
                }
                ck_assert_int_eq(tr.n_real[(size_t)l * tr.capacity + t], nr);
            }
        nm_trace_sample_free(&tr);
    }
    nm_engine_free(e);
    nm_model_free(&m);
}
END_TEST

START_TEST(test_sequence_layout) {
    nm_config c = small_config(1, 6, 0);
    nm_sequence s;
    nm_error err;
    ck_assert_int_eq(nm_sequence_build(&s, &c, "ab", 1, 2, &err), NM_OK);
    const int np = 16;
    ck_assert_int_eq(s.n, 1 + 1 + np + 1 + 2);
    ck_assert_int_eq(s.cap, s.n + 2);
    ck_assert_int_eq(s.id[0], 256);
    ck_assert_int_eq(s.id[1], 258);
    for (int p = 0; p < np; p++) {
        ck_assert_int_eq(s.id[2 + p], -1);
        ck_assert_int_eq(s.patch[2 + p], p);
        ck_assert_int_eq(s.modality[2 + p], NM_MOD_VISION);
        ck_assert_int_eq(s.segment[2 + p], NM_SEG_IMAGE);
    }
    ck_assert_int_eq(s.id[2 + np], 259);
    ck_assert_int_eq(s.segment[2 + np], NM_SEG_IMAGE);
    ck_assert_int_eq(s.id[3 + np], 'a');
    ck_assert_int_eq(s.modality[3 + np], NM_MOD_TEXT);
    ck_assert_int_eq(s.segment[4 + np], NM_SEG_PROMPT);
    char *d = nm_token_display(&c, &s, 7); // patch 5 on a 4x4 grid: row 1, col 1
    ck_assert_str_eq(d, "<patch 1,1>");
    free(d);
    ck_assert_int_eq(nm_sequence_push(&s, &c, '\n', &err), NM_OK);
    d = nm_token_display(&c, &s, s.n - 1);
    ck_assert_str_eq(d, "\xe2\x90\x8a"); // U+240A SYMBOL FOR LINE FEED
    free(d);
    ck_assert_int_eq(nm_sequence_push(&s, &c, 257, &err), NM_OK);
    ck_assert_int_eq(nm_sequence_push(&s, &c, 'x', &err), NM_ERR_LIMIT); // full
    nm_sequence_free(&s);
    // the answer text: a NUL or a stray byte becomes U+FFFD, never a cut string; EOS dropped
    ck_assert_int_eq(nm_sequence_build(&s, &c, "q", 0, 6, &err), NM_OK);
    const int32_t gen[6] = {'r', 0, 0xc3, 0xa9, 0xff, 257};
    for (int i = 0; i < 6; i++) ck_assert_int_eq(nm_sequence_push(&s, &c, gen[i], &err), NM_OK);
    char *ans = nm_sequence_answer(&c, &s);
    ck_assert_str_eq(ans, "r\xef\xbf\xbd\xc3\xa9\xef\xbf\xbd");
    free(ans);
    nm_sequence_free(&s);
    // invalid UTF-8 prompt and an image for a text-only model are refused
    ck_assert_int_eq(nm_sequence_build(&s, &c, "ok \xff", 0, 0, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "UTF-8"));
    nm_config t = small_config(0, 6, 0);
    ck_assert_int_eq(nm_sequence_build(&s, &t, "x", 1, 0, &err), NM_ERR_INVALID);
    // too long for max_positions
    char *longp = malloc(300);
    memset(longp, 'a', 299);
    longp[299] = '\0';
    ck_assert_int_eq(nm_sequence_build(&s, &t, longp, 0, 0, &err), NM_ERR_LIMIT);
    free(longp);
}
END_TEST

START_TEST(test_utf8) {
    size_t bad;
    ck_assert(nm_utf8_valid("plain", 5, &bad));
    ck_assert(nm_utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9, &bad)); // é € 😀
    ck_assert(!nm_utf8_valid("a\xc0\xaf", 3, &bad) && bad == 1);               // overlong '/'
    ck_assert(!nm_utf8_valid("\xed\xa0\x80", 3, &bad) && bad == 0);            // surrogate
    ck_assert(!nm_utf8_valid("\xf4\x90\x80\x80", 4, &bad));                    // > U+10FFFF
    ck_assert(!nm_utf8_valid("ab\xe2\x82", 4, &bad) && bad == 2);              // truncated
    ck_assert(!nm_utf8_valid("\x80", 1, &bad));                                // stray continuation
}
END_TEST

NM_TEST_SUITE(engine) {
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("engine");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_prefill_equals_decode);
    tcase_add_test(tc, test_trace_changes_nothing);
    tcase_add_test(tc, test_generate_trace_complete);
    tcase_add_test(tc, test_sequence_layout);
    tcase_add_test(tc, test_utf8);
    suite_add_tcase(s, tc);
    return s;
}
