// nm_report.c — report.md / report.json / report.csv from trace metrics (formats in nm_report.h).
#include "nm_report.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nm_fileutil.h"

#ifndef NM_VERSION
#define NM_VERSION "dev"
#endif

#define MOD_COLS (NM_MOD_COUNT + 1)

// Display order: the paper's (vision first), then special tokens, then all.
static const int MOD_ORDER[] = {NM_MOD_VISION, NM_MOD_TEXT, NM_MOD_SPECIAL, NM_MOD_ALL};
static const int SEG_ORDER[] = {NM_SEG_BOS, NM_SEG_IMAGE, NM_SEG_PROMPT, NM_SEG_ANSWER, NM_SEG_ALL};
#define N_MOD_ORDER ((int)(sizeof MOD_ORDER / sizeof MOD_ORDER[0]))
#define N_SEG_ORDER ((int)(sizeof SEG_ORDER / sizeof SEG_ORDER[0]))

// One-line definitions: the md "Definitions" section and the JSON "definitions" object.
static const struct { const char *key, *text; } DEFINITIONS[] = {
    {"compute_score", "c_{l,t} = n_real/K for token t in MoE layer l (n_real = how many of its K selected slots "
                      "went to real experts); c_t = mean of c_{l,t} over the L layers"},
    {"intensity", "compute intensity of a modality, segment or layer: mean of c_t (per layer: of c_{l,t}) over "
                  "its tokens; n/a (null) when it has no tokens"},
    {"token_share", "token distribution: the modality's share of the tokens"},
    {"compute_share", "compute distribution: the modality's share of the sum of c_t over all tokens; undefined "
                      "(null) when every token has c_t = 0"},
    {"compute_sum", "sum of c_t over the modality's tokens"},
    {"null_slot_ratio", "1 - mean c over all (layer, token) pairs: the share of all selected slots that went to "
                        "null (zero-compute) experts"},
    {"zero_compute_ratio", "share of (layer, token) pairs with n_real = 0 (the token skips the routed experts "
                           "of that layer entirely)"},
    {"polarization", "counts of (layer, token) pairs with n_real = 0, 1, ..., K (index k = n_real)"},
    {"polarization_share", "polarization counts divided by the number of (layer, token) pairs of the group"},
    {"rho", "data sparsity N/(N+M); expected real experts per token = K*rho"},
    {"aggregation", "token-weighted: every token of every sample of a trace counts once, as if the samples "
                    "were one sequence"},
    {"modalities", "vision = image patches; text = prompt and answer bytes; special = BOS, EOS and the image "
                   "delimiters; all = every token"},
    {"segments", "bos = the BOS token; image = the patches and their delimiters; prompt = the prompt bytes; "
                 "answer = the generated tokens (EOS included)"},
};
#define N_DEFINITIONS ((int)(sizeof DEFINITIONS / sizeof DEFINITIONS[0]))

// =============================================================================================
// Loading

void nm_report_trace_free(nm_report_trace *r) {
    if (!r) return;
    nm_metrics_free(&r->agg);
    if (r->per_sample_metrics)
        for (int i = 0; i < r->n_samples; i++) nm_metrics_free(&r->per_sample_metrics[i]);
    if (r->samples)
        for (int i = 0; i < r->n_samples; i++) {
            free(r->samples[i].image_path);
            free(r->samples[i].prompt);
            free(r->samples[i].answer);
        }
    free(r->per_sample_metrics);
    free(r->samples);
    free(r->path);
    memset(r, 0, sizeof *r);
}

nm_status nm_report_trace_begin(nm_report_trace *r, const char *path, const nm_trace_info *info, int per_sample,
                                nm_error *err) {
    if (!r || !path || !info) return nm_fail(err, NM_ERR_INTERNAL, "nm_report_trace_begin: NULL argument");
    memset(r, 0, sizeof *r);
    r->info = *info;
    r->info.num_samples = 0;
    r->per_sample = per_sample ? 1 : 0;
    nm_status st = nm_metrics_init(&r->agg, info->cfg.num_layers, info->cfg.moe.top_k, err);
    if (st != NM_OK) {
        nm_error_prefix(err, "%s", path);
        nm_report_trace_free(r);
        return st;
    }
    if (!(r->path = strdup(path))) {
        nm_report_trace_free(r);
        return NM_NOMEM(err, "report path");
    }
    return NM_OK;
}

static char *dup_or_null(const char *s, int *bad) {
    if (!s) return NULL;
    char *d = strdup(s);
    if (!d) *bad = 1;
    return d;
}

nm_status nm_report_trace_add(nm_report_trace *r, const nm_trace_sample *s, nm_error *err) {
    if (!r || !r->agg.polarization || !s) return nm_fail(err, NM_ERR_INTERNAL, "nm_report_trace_add: bad argument");
    nm_metrics one = {0};
    nm_report_sample id = {0};
    nm_status st;
    if (r->per_sample) {
        if (r->n_samples == r->cap) { // grow both arrays first, so that a failure leaves r as it was
            int cap = r->cap ? 2 * r->cap : 16;
            nm_metrics *pm = realloc(r->per_sample_metrics, (size_t)cap * sizeof *pm);
            if (!pm) return NM_NOMEM(err, "per-sample metrics");
            r->per_sample_metrics = pm;
            nm_report_sample *ps = realloc(r->samples, (size_t)cap * sizeof *ps);
            if (!ps) return NM_NOMEM(err, "per-sample records");
            r->samples = ps;
            r->cap = cap;
        }
        if ((st = nm_metrics_init(&one, r->agg.n_layers, r->agg.top_k, err)) != NM_OK) return st;
        if ((st = nm_metrics_add_sample(&one, s, err)) != NM_OK) {
            nm_metrics_free(&one);
            return st;
        }
        nm_metrics_finish(&one);
        int bad = 0;
        id.index = r->n_samples;
        id.image_path = dup_or_null(s->image_path && s->image_path[0] ? s->image_path : NULL, &bad);
        id.prompt = dup_or_null(s->prompt ? s->prompt : "", &bad);
        id.answer = dup_or_null(s->answer ? s->answer : "", &bad);
        id.n_tokens = s->n_tokens;
        id.n_prompt_tokens = s->n_prompt_tokens;
        if (bad) {
            st = NM_NOMEM(err, "sample strings");
            goto fail;
        }
    }
    if ((st = nm_metrics_add_sample(&r->agg, s, err)) != NM_OK) goto fail;
    if (r->per_sample) {
        r->per_sample_metrics[r->n_samples] = one;
        r->samples[r->n_samples] = id;
    }
    r->n_samples++;
    r->info.num_samples = r->n_samples;
    return NM_OK;
fail:
    nm_metrics_free(&one);
    free(id.image_path);
    free(id.prompt);
    free(id.answer);
    return st;
}

void nm_report_trace_finish(nm_report_trace *r) {
    if (r) nm_metrics_finish(&r->agg);
}

nm_status nm_report_trace_load(nm_report_trace *r, const char *path, int per_sample, nm_report_progress_fn progress,
                               void *progress_ctx, nm_error *err) {
    if (!r || !path) return nm_fail(err, NM_ERR_INTERNAL, "nm_report_trace_load: NULL argument");
    memset(r, 0, sizeof *r);
    nm_trace_info info;
    nm_trace_reader *rd = NULL; // one open file: one committed state, also while a batch writes
    nm_status st = nm_trace_reader_open(&rd, path, &info, err);
    if (st != NM_OK) return st;
    if ((st = nm_report_trace_begin(r, path, &info, per_sample, err)) != NM_OK) {
        nm_trace_reader_close(rd);
        return st;
    }
    for (int i = 0; i < info.num_samples; i++) {
        nm_trace_sample s;
        if ((st = nm_trace_reader_read_sample(rd, &s, i, err)) != NM_OK) break; // names file and dataset
        st = nm_report_trace_add(r, &s, err);
        nm_trace_sample_free(&s);
        if (st != NM_OK) {
            nm_error_prefix(err, "%s: sample %d", path, i);
            break;
        }
        if (progress) progress(progress_ctx, i + 1, info.num_samples);
    }
    nm_trace_reader_close(rd);
    if (st != NM_OK) {
        nm_report_trace_free(r);
        return st;
    }
    nm_report_trace_finish(r);
    return NM_OK;
}

// =============================================================================================
// Text helpers

typedef struct {
    char *p;
    size_t n, cap;
    int bad; // an allocation failed: the text is incomplete
} sbuf;

static void sb_grow(sbuf *b, size_t extra) {
    if (b->bad) return;
    if (b->n + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->bad = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

static void sb_putn(sbuf *b, const char *s, size_t n) {
    sb_grow(b, n);
    if (b->bad) return;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3))) static void sb_printf(sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->bad = 1;
        return;
    }
    if ((size_t)n < sizeof small) {
        sb_putn(b, small, (size_t)n);
        return;
    }
    sb_grow(b, (size_t)n);
    if (b->bad) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)n;
}

// Returns the finished text or NULL (and err) when an allocation failed.
static char *sb_finish(sbuf *b, nm_error *err, const char *what) {
    if (!b->bad && !b->p) sb_puts(b, "");
    if (b->bad) {
        free(b->p);
        NM_NOMEM(err, what);
        return NULL;
    }
    return b->p;
}

// Length of the valid UTF-8 sequence at s (1 … 4), or 0 if the bytes there are not one.
static int utf8_len(const unsigned char *s) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    int n;
    unsigned min;
    if (c >= 0xc2 && c <= 0xdf) n = 2, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef) n = 3, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4) n = 4, min = 0x10000;
    else return 0;
    unsigned cp = c & (0x7f >> n);
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return n;
}

// A valid UTF-8 copy of s: a byte that starts no valid character becomes U+FFFD. NULL on NOMEM.
static char *utf8_clean(const char *s) {
    size_t n = strlen(s);
    char *o = malloc(3 * n + 1);
    if (!o) return NULL;
    size_t j = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        int l = utf8_len(p);
        if (l == 0) {
            memcpy(o + j, "\xef\xbf\xbd", 3);
            j += 3;
            p++;
        } else {
            memcpy(o + j, p, (size_t)l);
            j += (size_t)l;
            p += l;
        }
    }
    o[j] = '\0';
    return o;
}

// Markdown text: ASCII punctuation that Markdown (or a GFM table) would interpret is
// backslash-escaped; control characters are shown as \n, \t, \xNN; invalid UTF-8 as U+FFFD.
// max_chars > 0 cuts the text after that many characters and adds "…".
static void md_text(sbuf *b, const char *s, int max_chars) {
    if (!s) s = "";
    int chars = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        if (max_chars > 0 && chars == max_chars) {
            sb_puts(b, "…");
            return;
        }
        chars++;
        unsigned c = *p;
        if (c == '\n') sb_puts(b, "\\\\n");
        else if (c == '\t') sb_puts(b, "\\\\t");
        else if (c < 0x20 || c == 0x7f) sb_printf(b, "\\\\x%02x", c);
        else if (c < 0x80 && strchr("\\`*_[]<>|~#&!$", (int)c)) {
            char e[3] = {'\\', (char)c, 0};
            sb_puts(b, e);
        } else if (c < 0x80) sb_putn(b, (const char *)p, 1);
        else {
            int l = utf8_len(p);
            if (l == 0) {
                sb_puts(b, "\xef\xbf\xbd");
                p++;
                continue;
            }
            sb_putn(b, (const char *)p, (size_t)l);
            p += l;
            continue;
        }
        p++;
    }
}

// 4 significant digits for people: 0.06250, 1.000, 0.000, 1.000e-05. NAN → `undef`.
static void md_num(sbuf *b, double v, const char *undef) {
    if (isnan(v)) sb_puts(b, undef);
    else sb_printf(b, "%#.4g", v);
}

// =============================================================================================
// Derived values shared by the three formats

static long long seg_pairs(const nm_metrics *m, int layer, int seg) {
    long long p = 0;
    for (int k = 0; k <= m->top_k; k++) p += nm_metrics_seg_polarization(m, layer, seg, k);
    return p;
}

static double seg_zero_compute(const nm_metrics *m, int layer, int seg) {
    long long p = seg_pairs(m, layer, seg);
    return p > 0 ? (double)nm_metrics_seg_polarization(m, layer, seg, 0) / (double)p : NAN;
}

static double pol_share(const nm_metrics *m, int layer, int mod, int k) {
    long long p = nm_metrics_pairs(m, layer, mod);
    return p > 0 ? (double)nm_metrics_polarization(m, layer, mod, k) / (double)p : NAN;
}

static double rho_of(const nm_report_trace *t) {
    int N = t->info.cfg.moe.num_experts, M = t->info.cfg.moe.null_copies;
    return N + M > 0 ? (double)N / (double)(N + M) : NAN;
}

static const char *null_kind_name(const nm_report_trace *t) {
    return t->info.cfg.moe.null_kind == NM_NULL_COPY ? "copy" : "zero";
}

static nm_status check_args(const nm_report_trace *r, int n, nm_error *err) {
    if (!r || n < 1) return nm_fail(err, NM_ERR_INTERNAL, "report: no traces");
    for (int i = 0; i < n; i++)
        if (!r[i].agg.polarization || !r[i].path)
            return nm_fail(err, NM_ERR_INTERNAL, "report: trace %d is not loaded", i);
    return NM_OK;
}

// =============================================================================================
// report.md

// The header rule of a table: the first `left` columns left-aligned (names), the rest right (numbers).
static void md_rule(sbuf *b, int cols, int left) {
    sb_puts(b, "|");
    for (int i = 0; i < cols; i++) sb_puts(b, i < left ? " --- |" : " ---: |");
    sb_puts(b, "\n");
}

static void md_cell_num(sbuf *b, double v, const char *undef) {
    sb_puts(b, " ");
    md_num(b, v, undef);
    sb_puts(b, " |");
}

static void md_modality_table(sbuf *b, const nm_metrics *m) {
    sb_puts(b, "| modality | tokens | token share | compute share | intensity | zero-compute ratio |\n");
    md_rule(b, 6, 1);
    for (int i = 0; i < N_MOD_ORDER; i++) {
        int g = MOD_ORDER[i];
        sb_printf(b, "| %s | %lld |", nm_modality_name(g), m->n_tokens[g]);
        md_cell_num(b, m->token_share[g], "n/a");
        md_cell_num(b, m->compute_share[g], "undefined");
        md_cell_num(b, m->intensity[g], "n/a");
        md_cell_num(b, nm_metrics_zero_compute(m, m->n_layers, g), "n/a");
        sb_puts(b, "\n");
    }
}

static void md_segment_table(sbuf *b, const nm_metrics *m) {
    sb_puts(b, "| segment | tokens | intensity | zero-compute ratio |\n");
    md_rule(b, 4, 1);
    for (int i = 0; i < N_SEG_ORDER; i++) {
        int g = SEG_ORDER[i];
        sb_printf(b, "| %s | %lld |", nm_segment_name(g), m->n_seg_tokens[g]);
        md_cell_num(b, m->seg_intensity[g], "n/a");
        md_cell_num(b, seg_zero_compute(m, m->n_layers, g), "n/a");
        sb_puts(b, "\n");
    }
}

static void md_layer_table(sbuf *b, const nm_metrics *m) {
    sb_puts(b, "| layer | vision | text | special | all | zero-compute ratio |\n");
    md_rule(b, 6, 1);
    for (int l = 0; l <= m->n_layers; l++) {
        if (l < m->n_layers) sb_printf(b, "| %d |", l);
        else sb_puts(b, "| all |");
        for (int i = 0; i < N_MOD_ORDER; i++) md_cell_num(b, nm_metrics_layer_intensity(m, l, MOD_ORDER[i]), "n/a");
        md_cell_num(b, nm_metrics_zero_compute(m, l, NM_MOD_ALL), "n/a");
        sb_puts(b, "\n");
    }
}

static void md_polarization_header(sbuf *b, const char *first, int K) {
    sb_printf(b, "| %s | pairs |", first);
    for (int k = 0; k <= K; k++) sb_printf(b, " n_real=%d |", k);
    sb_puts(b, "\n");
    md_rule(b, K + 3, 1);
}

static void md_polarization_tables(sbuf *b, const nm_metrics *m) {
    int K = m->top_k, L = m->n_layers;
    sb_puts(b, "Share of (layer, token) pairs with n_real = k real experts among the K slots; pairs = tokens × "
               "layers.\n\n");
    md_polarization_header(b, "modality", K);
    for (int i = 0; i < N_MOD_ORDER; i++) {
        int g = MOD_ORDER[i];
        sb_printf(b, "| %s | %lld |", nm_modality_name(g), nm_metrics_pairs(m, L, g));
        for (int k = 0; k <= K; k++) md_cell_num(b, pol_share(m, L, g, k), "n/a");
        sb_puts(b, "\n");
    }
    sb_puts(b, "\nBy layer (all tokens):\n\n");
    md_polarization_header(b, "layer", K);
    for (int l = 0; l < L; l++) {
        sb_printf(b, "| %d | %lld |", l, nm_metrics_pairs(m, l, NM_MOD_ALL));
        for (int k = 0; k <= K; k++) md_cell_num(b, pol_share(m, l, NM_MOD_ALL, k), "n/a");
        sb_puts(b, "\n");
    }
}

static void md_comparison(sbuf *b, const nm_report_trace *r, int n) {
    sb_puts(b, "## Comparison\n\nOne row per trace (a sparsity sweep side by side); every value over all samples "
               "of the trace.\n\n");
    sb_puts(b, "| # | trace | L | K | ρ | K·ρ | samples | tokens | null slot ratio | zero-compute ratio | "
               "vision intensity | text intensity | vision compute share | text compute share |\n");
    md_rule(b, 14, 2);
    for (int i = 0; i < n; i++) {
        const nm_report_trace *t = &r[i];
        const nm_metrics *m = &t->agg;
        sb_printf(b, "| %d | ", i + 1);
        md_text(b, t->path, 0);
        sb_printf(b, " | %d | %d |", m->n_layers, m->top_k);
        md_cell_num(b, rho_of(t), "n/a");
        md_cell_num(b, m->top_k * rho_of(t), "n/a");
        sb_printf(b, " %d | %lld |", t->n_samples, m->n_tokens[NM_MOD_ALL]);
        md_cell_num(b, m->null_slot_ratio, "n/a");
        md_cell_num(b, m->zero_compute_ratio, "n/a");
        md_cell_num(b, m->intensity[NM_MOD_VISION], "n/a");
        md_cell_num(b, m->intensity[NM_MOD_TEXT], "n/a");
        md_cell_num(b, m->compute_share[NM_MOD_VISION], m->n_tokens[NM_MOD_ALL] ? "undefined" : "n/a");
        md_cell_num(b, m->compute_share[NM_MOD_TEXT], m->n_tokens[NM_MOD_ALL] ? "undefined" : "n/a");
        sb_puts(b, "\n");
    }
    sb_puts(b, "\n");
}

static void md_samples(sbuf *b, const nm_report_trace *t, int ti) {
    sb_printf(b, "### Samples of trace %d\n\n", ti + 1);
    sb_puts(b, "Sample numbers are 0-based, in the order of the sample names in the file. Intensities by "
               "modality; zero-compute ratio over all layers.\n\n");
    sb_puts(b, "| # | image | prompt | tokens | vision | text | special | all | zero-compute ratio |\n");
    md_rule(b, 9, 3);
    for (int i = 0; i < t->n_samples; i++) {
        const nm_report_sample *s = &t->samples[i];
        const nm_metrics *m = &t->per_sample_metrics[i];
        sb_printf(b, "| %d | ", s->index);
        if (s->image_path) md_text(b, s->image_path, 40);
        else sb_puts(b, "–");
        sb_puts(b, " | ");
        md_text(b, s->prompt, 60);
        sb_printf(b, " | %d |", s->n_tokens);
        for (int k = 0; k < N_MOD_ORDER; k++) md_cell_num(b, m->intensity[MOD_ORDER[k]], "n/a");
        md_cell_num(b, m->zero_compute_ratio, "n/a");
        sb_puts(b, "\n");
    }
    sb_puts(b, "\n");
    for (int i = 0; i < t->n_samples; i++) {
        const nm_report_sample *s = &t->samples[i];
        const nm_metrics *m = &t->per_sample_metrics[i];
        sb_printf(b, "#### Trace %d, sample %d\n\n", ti + 1, s->index);
        sb_puts(b, "- image: ");
        if (s->image_path) md_text(b, s->image_path, 0);
        else sb_puts(b, "none");
        sb_puts(b, "\n- prompt: ");
        md_text(b, s->prompt, 0);
        sb_puts(b, "\n- answer: ");
        md_text(b, s->answer, 0);
        sb_printf(b, "\n- %d tokens (%d before the answer)\n", s->n_tokens, s->n_prompt_tokens);
        sb_puts(b, "- null slot ratio ");
        md_num(b, m->null_slot_ratio, "n/a");
        sb_puts(b, ", zero-compute ratio ");
        md_num(b, m->zero_compute_ratio, "n/a");
        sb_puts(b, "\n\n");
        md_modality_table(b, m);
        sb_puts(b, "\n");
        md_segment_table(b, m);
        sb_puts(b, "\n");
    }
}

static void md_trace(sbuf *b, const nm_report_trace *t, int ti) {
    const nm_metrics *m = &t->agg;
    const nm_config *c = &t->info.cfg;
    double rho = rho_of(t);
    sb_printf(b, "## Trace %d: ", ti + 1);
    md_text(b, t->path, 0);
    sb_puts(b, "\n\n");
    sb_puts(b, "| L | N | M | K | ρ = N/(N+M) | K·ρ | null kind | samples | tokens |\n");
    md_rule(b, 9, 0);
    sb_printf(b, "| %d | %d | %d | %d |", c->num_layers, c->moe.num_experts, c->moe.null_copies, c->moe.top_k);
    md_cell_num(b, rho, "n/a");
    md_cell_num(b, c->moe.top_k * rho, "n/a");
    sb_printf(b, " %s | %d | %lld |\n\n", null_kind_name(t), t->n_samples, m->n_tokens[NM_MOD_ALL]);
    sb_puts(b, "Model: ");
    md_text(b, t->info.model_name[0] ? t->info.model_name : "(not recorded)", 0);
    sb_puts(b, " · written by ");
    md_text(b, t->info.created_by[0] ? t->info.created_by : "(not recorded)", 0);
    sb_puts(b, "\n\n");
    if (t->n_samples == 0) sb_puts(b, "The trace holds no samples: every value below is n/a.\n\n");
    sb_puts(b, "**Null slot ratio ");
    md_num(b, m->null_slot_ratio, "n/a");
    sb_puts(b, ", zero-compute ratio ");
    md_num(b, m->zero_compute_ratio, "n/a");
    sb_puts(b, "**");
    if (!m->compute_share_defined && m->n_tokens[NM_MOD_ALL] > 0)
        sb_puts(b, " (every token has compute 0: the compute distribution is undefined)");
    sb_puts(b, "\n\n");

    sb_puts(b, "### By modality\n\nAll layers; intensity = mean compute score c_t of the modality's tokens.\n\n");
    md_modality_table(b, m);
    sb_puts(b, "\n### By layer\n\nCompute intensity (mean n_real/K) of each modality in each layer; the "
               "zero-compute ratio of the layer over all its tokens. Row \"all\" = the mean over layers.\n\n");
    md_layer_table(b, m);
    sb_puts(b, "\n### By segment\n\nThe insets of the overlay pictures: mean compute of the BOS token, the "
               "image (patches and delimiters), the prompt and the answer.\n\n");
    md_segment_table(b, m);
    sb_puts(b, "\n### Polarization\n\n");
    md_polarization_tables(b, m);
    sb_puts(b, "\n");
    if (t->per_sample) md_samples(b, t, ti);
}

static void md_definitions(sbuf *b, int kmax) {
    sb_puts(b, "## Definitions\n\n");
    for (int i = 0; i < N_DEFINITIONS; i++) {
        sb_printf(b, "- **%s**: ", DEFINITIONS[i].key);
        md_text(b, DEFINITIONS[i].text, 0);
        sb_puts(b, "\n");
    }
    sb_puts(b, "\nValues have 4 significant digits. n/a: the group has no tokens (a mean over nothing); "
               "undefined: the compute distribution when every token has compute 0. Neither is ever "
               "written as 0. report.json holds the same numbers (with 10 significant digits and the exact "
               "polarization counts) and these definitions.\n\n");
    sb_puts(b, "### report.csv columns\n\nOne row per trace × layer × modality (layers 0 … L−1, then \"all\"; "
               "modalities vision, text, special, all); with per-sample sections, the same rows again for "
               "each sample. Empty cell = undefined.\n\n");
    static const char *cols[][2] = {
        {"trace", "the trace file path"},
        {"sample", "\"all\" for the whole trace, else the 0-based sample number"},
        {"num_layers, num_experts, null_copies, K", "L, N, M and top-K of the model"},
        {"rho", "N/(N+M)"},
        {"null_kind", "zero or copy"},
        {"layer", "0 … L−1, or all (the mean over layers)"},
        {"modality", "vision, text, special or all"},
        {"tokens", "tokens of the modality"},
        {"token_share", "the modality's share of the tokens"},
        {"compute_share", "the modality's share of the sum of c_t (layer all rows only)"},
        {"intensity", "mean n_real/K over the modality's (layer, token) pairs"},
        {"zero_compute_ratio", "share of those pairs with n_real = 0"},
        {"n_real_0 … n_real_K", "share of those pairs with n_real = k (empty beyond the trace's own K)"},
    };
    sb_puts(b, "| column | meaning |\n| --- | --- |\n");
    for (size_t i = 0; i < sizeof cols / sizeof cols[0]; i++) {
        sb_puts(b, "| ");
        md_text(b, cols[i][0], 0);
        sb_puts(b, " | ");
        md_text(b, cols[i][1], 0);
        sb_puts(b, " |\n");
    }
    sb_printf(b, "\n(In this report the largest K is %d, so the columns run to n\\_real\\_%d.)\n", kmax, kmax);
}

static int max_top_k(const nm_report_trace *r, int n) {
    int k = 0;
    for (int i = 0; i < n; i++)
        if (r[i].agg.top_k > k) k = r[i].agg.top_k;
    return k;
}

char *nm_report_md(const nm_report_trace *r, int n, nm_error *err) {
    if (check_args(r, n, err) != NM_OK) return NULL;
    sbuf b = {0};
    long long samples = 0;
    for (int i = 0; i < n; i++) samples += r[i].n_samples;
    sb_puts(&b, "# nullmap report\n\n");
    sb_printf(&b, "%d trace%s, %lld sample%s; written by nullmap %s. Every value of a trace is over all its "
                  "samples, token-weighted (every token counts once). Definitions at the end.\n\n",
              n, n == 1 ? "" : "s", samples, samples == 1 ? "" : "s", NM_VERSION);
    if (n > 1) md_comparison(&b, r, n);
    for (int i = 0; i < n; i++) md_trace(&b, &r[i], i);
    md_definitions(&b, max_top_k(r, n));
    return sb_finish(&b, err, "report.md text");
}

// =============================================================================================
// report.json

// Builds JSON without checking every call: json_object_set_new(o, k, NULL) fails cleanly, and
// any failure sets *bad. Numbers: NAN → null.
typedef struct {
    int bad;
} jctx;

static void jset(jctx *j, json_t *o, const char *key, json_t *v) {
    if (!o || !v || json_object_set_new(o, key, v) != 0) j->bad = 1;
}
static void jappend(jctx *j, json_t *a, json_t *v) {
    if (!a || !v || json_array_append_new(a, v) != 0) j->bad = 1;
}
static json_t *jnum(double v) { return isnan(v) || isinf(v) ? json_null() : json_real(v); }
static json_t *jstr(jctx *j, const char *s) {
    if (!s) return json_null();
    char *c = utf8_clean(s);
    if (!c) {
        j->bad = 1;
        return NULL;
    }
    json_t *v = json_string(c);
    free(c);
    return v;
}

static json_t *j_pol_counts(jctx *j, const nm_metrics *m, int layer, int g, int seg) {
    json_t *a = json_array();
    for (int k = 0; k <= m->top_k; k++)
        jappend(j, a, json_integer(seg ? nm_metrics_seg_polarization(m, layer, g, k)
                                       : nm_metrics_polarization(m, layer, g, k)));
    return a;
}

static json_t *j_metrics(jctx *j, const nm_metrics *m) {
    int L = m->n_layers;
    json_t *o = json_object();
    jset(j, o, "tokens", json_integer(m->n_tokens[NM_MOD_ALL]));
    jset(j, o, "null_slot_ratio", jnum(m->null_slot_ratio));
    jset(j, o, "zero_compute_ratio", jnum(m->zero_compute_ratio));
    jset(j, o, "compute_share_defined", json_boolean(m->compute_share_defined));
    json_t *mods = json_object();
    for (int i = 0; i < N_MOD_ORDER; i++) {
        int g = MOD_ORDER[i];
        json_t *x = json_object();
        jset(j, x, "tokens", json_integer(m->n_tokens[g]));
        jset(j, x, "token_share", jnum(m->token_share[g]));
        jset(j, x, "compute_sum", jnum(m->compute_sum[g]));
        jset(j, x, "compute_share", jnum(m->compute_share[g]));
        jset(j, x, "intensity", jnum(m->intensity[g]));
        jset(j, x, "zero_compute_ratio", jnum(nm_metrics_zero_compute(m, L, g)));
        jset(j, x, "polarization", j_pol_counts(j, m, L, g, 0));
        json_t *sh = json_array();
        for (int k = 0; k <= m->top_k; k++) jappend(j, sh, jnum(pol_share(m, L, g, k)));
        jset(j, x, "polarization_share", sh);
        jset(j, mods, nm_modality_name(g), x);
    }
    jset(j, o, "modalities", mods);
    json_t *segs = json_object();
    for (int i = 0; i < N_SEG_ORDER; i++) {
        int g = SEG_ORDER[i];
        json_t *x = json_object();
        jset(j, x, "tokens", json_integer(m->n_seg_tokens[g]));
        jset(j, x, "intensity", jnum(m->seg_intensity[g]));
        jset(j, x, "zero_compute_ratio", jnum(seg_zero_compute(m, L, g)));
        jset(j, x, "polarization", j_pol_counts(j, m, L, g, 1));
        jset(j, segs, nm_segment_name(g), x);
    }
    jset(j, o, "segments", segs);
    json_t *layers = json_array();
    for (int l = 0; l < L && !j->bad; l++) {
        json_t *x = json_object();
        jset(j, x, "layer", json_integer(l));
        json_t *lm = json_object();
        for (int i = 0; i < N_MOD_ORDER; i++) {
            int g = MOD_ORDER[i];
            json_t *y = json_object();
            jset(j, y, "intensity", jnum(nm_metrics_layer_intensity(m, l, g)));
            jset(j, y, "zero_compute_ratio", jnum(nm_metrics_zero_compute(m, l, g)));
            jset(j, y, "polarization", j_pol_counts(j, m, l, g, 0));
            jset(j, lm, nm_modality_name(g), y);
        }
        jset(j, x, "modalities", lm);
        json_t *ls = json_object();
        for (int i = 0; i < N_SEG_ORDER; i++) {
            int g = SEG_ORDER[i];
            json_t *y = json_object();
            jset(j, y, "intensity", jnum(nm_metrics_layer_seg_intensity(m, l, g)));
            jset(j, ls, nm_segment_name(g), y);
        }
        jset(j, x, "segments", ls);
        jappend(j, layers, x);
    }
    jset(j, o, "layers", layers);
    return o;
}

static json_t *j_trace(jctx *j, const nm_report_trace *t) {
    const nm_config *c = &t->info.cfg;
    json_t *o = json_object();
    jset(j, o, "path", jstr(j, t->path));
    jset(j, o, "model", jstr(j, t->info.model_name));
    jset(j, o, "created_by", jstr(j, t->info.created_by));
    json_t *cfg = json_object();
    jset(j, cfg, "num_layers", json_integer(c->num_layers));
    jset(j, cfg, "num_experts", json_integer(c->moe.num_experts));
    jset(j, cfg, "null_copies", json_integer(c->moe.null_copies));
    jset(j, cfg, "top_k", json_integer(c->moe.top_k));
    jset(j, cfg, "rho", jnum(rho_of(t)));
    jset(j, cfg, "expected_real_per_token", jnum(c->moe.top_k * rho_of(t)));
    jset(j, cfg, "null_kind", json_string(null_kind_name(t)));
    jset(j, o, "config", cfg);
    jset(j, o, "num_samples", json_integer(t->n_samples));
    jset(j, o, "metrics", j_metrics(j, &t->agg));
    if (t->per_sample) {
        json_t *arr = json_array();
        for (int i = 0; i < t->n_samples && !j->bad; i++) {
            const nm_report_sample *s = &t->samples[i];
            json_t *x = json_object();
            jset(j, x, "index", json_integer(s->index));
            jset(j, x, "image_path", jstr(j, s->image_path));
            jset(j, x, "prompt", jstr(j, s->prompt));
            jset(j, x, "answer", jstr(j, s->answer));
            jset(j, x, "n_tokens", json_integer(s->n_tokens));
            jset(j, x, "n_prompt_tokens", json_integer(s->n_prompt_tokens));
            jset(j, x, "metrics", j_metrics(j, &t->per_sample_metrics[i]));
            jappend(j, arr, x);
        }
        jset(j, o, "samples", arr);
    }
    return o;
}

char *nm_report_json(const nm_report_trace *r, int n, nm_error *err) {
    if (check_args(r, n, err) != NM_OK) return NULL;
    jctx j = {0};
    json_t *root = json_object();
    jset(&j, root, "format", json_string("nullmap-report"));
    jset(&j, root, "format_version", json_integer(1));
    jset(&j, root, "created_by", json_string("nullmap " NM_VERSION));
    json_t *defs = json_object();
    for (int i = 0; i < N_DEFINITIONS; i++) jset(&j, defs, DEFINITIONS[i].key, json_string(DEFINITIONS[i].text));
    jset(&j, root, "definitions", defs);
    json_t *traces = json_array();
    for (int i = 0; i < n && !j.bad; i++) jappend(&j, traces, j_trace(&j, &r[i]));
    jset(&j, root, "traces", traces);
    char *text = NULL;
    if (!j.bad) text = json_dumps(root, JSON_INDENT(1) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(root);
    if (!text) {
        NM_NOMEM(err, "report.json text");
        return NULL;
    }
    // json_dumps memory comes from jansson's allocator (malloc by default); copy with a newline
    // so that the caller frees with free() whatever allocator jansson uses.
    size_t len = strlen(text);
    char *out = malloc(len + 2);
    if (out) {
        memcpy(out, text, len);
        out[len] = '\n';
        out[len + 1] = '\0';
    } else NM_NOMEM(err, "report.json text");
    json_free_t free_fn;
    json_get_alloc_funcs(NULL, &free_fn);
    free_fn(text);
    return out;
}

// =============================================================================================
// report.csv

// RFC 4180 field: quoted when it holds a comma, quote, CR or LF (quotes doubled).
static void csv_text(sbuf *b, const char *s) {
    char *c = utf8_clean(s ? s : "");
    if (!c) {
        b->bad = 1;
        return;
    }
    if (strpbrk(c, ",\"\r\n")) {
        sb_puts(b, "\"");
        for (const char *p = c; *p; p++) {
            if (*p == '"') sb_puts(b, "\"\"");
            else sb_putn(b, p, 1);
        }
        sb_puts(b, "\"");
    } else sb_puts(b, c);
    free(c);
}

static void csv_num(sbuf *b, double v) {
    sb_puts(b, ",");
    if (!isnan(v) && !isinf(v)) sb_printf(b, "%.10g", v);
}

static void csv_block(sbuf *b, const nm_report_trace *t, const nm_metrics *m, int sample, int kmax) {
    const nm_config *c = &t->info.cfg;
    int L = m->n_layers;
    for (int l = 0; l <= L; l++)
        for (int i = 0; i < N_MOD_ORDER; i++) {
            int g = MOD_ORDER[i];
            csv_text(b, t->path);
            if (sample < 0) sb_puts(b, ",all");
            else sb_printf(b, ",%d", sample);
            sb_printf(b, ",%d,%d,%d,%d", c->num_layers, c->moe.num_experts, c->moe.null_copies, c->moe.top_k);
            csv_num(b, rho_of(t));
            sb_printf(b, ",%s", null_kind_name(t));
            if (l < L) sb_printf(b, ",%d", l);
            else sb_puts(b, ",all");
            sb_printf(b, ",%s,%lld", nm_modality_name(g), m->n_tokens[g]);
            csv_num(b, m->token_share[g]);
            csv_num(b, l == L ? m->compute_share[g] : NAN);
            csv_num(b, nm_metrics_layer_intensity(m, l, g));
            csv_num(b, nm_metrics_zero_compute(m, l, g));
            for (int k = 0; k <= kmax; k++) csv_num(b, k <= m->top_k ? pol_share(m, l, g, k) : NAN);
            sb_puts(b, "\n");
        }
}

char *nm_report_csv(const nm_report_trace *r, int n, nm_error *err) {
    if (check_args(r, n, err) != NM_OK) return NULL;
    int kmax = max_top_k(r, n);
    sbuf b = {0};
    sb_puts(&b, "trace,sample,num_layers,num_experts,null_copies,K,rho,null_kind,layer,modality,tokens,"
                "token_share,compute_share,intensity,zero_compute_ratio");
    for (int k = 0; k <= kmax; k++) sb_printf(&b, ",n_real_%d", k);
    sb_puts(&b, "\n");
    for (int i = 0; i < n; i++) {
        csv_block(&b, &r[i], &r[i].agg, -1, kmax);
        if (r[i].per_sample && r[i].per_sample_metrics)
            for (int s = 0; s < r[i].n_samples; s++)
                csv_block(&b, &r[i], &r[i].per_sample_metrics[s], r[i].samples[s].index, kmax);
    }
    return sb_finish(&b, err, "report.csv text");
}

// =============================================================================================
// Writing

typedef char *(*builder_fn)(const nm_report_trace *, int, nm_error *);

static nm_status write_one(builder_fn build, const nm_report_trace *r, int n, const char *path, nm_error *err) {
    if (!path) return nm_fail(err, NM_ERR_INTERNAL, "report: NULL path");
    char *text = build(r, n, err);
    if (!text) return err ? err->code : NM_ERR_NOMEM;
    nm_status st = nm_write_file_atomic(path, text, strlen(text), err);
    free(text);
    return st;
}

nm_status nm_report_write_md(const nm_report_trace *r, int n, const char *path, nm_error *err) {
    return write_one(nm_report_md, r, n, path, err);
}
nm_status nm_report_write_json(const nm_report_trace *r, int n, const char *path, nm_error *err) {
    return write_one(nm_report_json, r, n, path, err);
}
nm_status nm_report_write_csv(const nm_report_trace *r, int n, const char *path, nm_error *err) {
    return write_one(nm_report_csv, r, n, path, err);
}

nm_status nm_report_write_dir(const nm_report_trace *r, int n, const char *dir, int overwrite, nm_error *err) {
    if (!dir) return nm_fail(err, NM_ERR_INTERNAL, "report: NULL directory");
    if (check_args(r, n, err) != NM_OK) return err ? err->code : NM_ERR_INTERNAL;
    if (!nm_is_dir(dir)) return nm_fail(err, NM_ERR_IO, "%s: not a directory", dir);
    enum { NF = 3 };
    static const char *names[NF] = {"report.md", "report.json", "report.csv"};
    static const builder_fn build[NF] = {nm_report_md, nm_report_json, nm_report_csv};
    char *paths[NF] = {0}, *text[NF] = {0};
    nm_atomic_file af[NF];
    for (int i = 0; i < NF; i++) memset(&af[i], 0, sizeof af[i]), af[i].fd = -1;
    int committed = 0;
    nm_status st = NM_OK;
    for (int i = 0; i < NF && st == NM_OK; i++) {
        if (!(paths[i] = nm_path_join(dir, names[i]))) st = NM_NOMEM(err, "path");
        else if (!overwrite && nm_path_exists(paths[i]))
            st = nm_fail(err, NM_ERR_IO, "%s already exists (not replaced)", paths[i]);
    }
    for (int i = 0; i < NF && st == NM_OK; i++)
        if (!(text[i] = build[i](r, n, err))) st = err ? err->code : NM_ERR_NOMEM;
    for (int i = 0; i < NF && st == NM_OK; i++) {
        st = nm_atomic_open(&af[i], paths[i], err);
        if (st == NM_OK) st = nm_atomic_write(&af[i], text[i], strlen(text[i]), err);
    }
    for (int i = 0; i < NF && st == NM_OK; i++) {
        st = nm_atomic_commit(&af[i], err); // frees af[i] whatever happens
        if (st == NM_OK) committed = i + 1;
    }
    if (st != NM_OK) {
        for (int i = 0; i < committed; i++) unlink(paths[i]); // no mixed set of old and new files
        for (int i = committed; i < NF; i++) nm_atomic_abort(&af[i]);
    }
    for (int i = 0; i < NF; i++) {
        free(paths[i]);
        free(text[i]);
    }
    return st;
}
