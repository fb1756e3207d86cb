// nm_metrics.c — compute metrics of null-expert routing (definitions in nm_metrics.h, DESIGN.md §5).
//
// Everything is accumulated as integer counts in two histograms, (layer, group, n_real) with the
// group a modality or a segment; sums of n_real and token counts are read back from them, and
// every double is one division of exact integers, done in nm_metrics_finish().
#include "nm_metrics.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MOD_COLS (NM_MOD_COUNT + 1)
#define SEG_COLS (NM_SEG_COUNT + 1)

static const char *const modality_names[] = {"text", "vision", "special"};
static const char *const segment_names[] = {"bos", "image", "prompt", "answer"};
_Static_assert(sizeof modality_names / sizeof modality_names[0] == NM_MOD_COUNT, "modality names");
_Static_assert(sizeof segment_names / sizeof segment_names[0] == NM_SEG_COUNT, "segment names");
_Static_assert(NM_MOD_TEXT == 0 && NM_MOD_VISION == 1 && NM_MOD_SPECIAL == 2, "modality codes");
_Static_assert(NM_SEG_BOS == 0 && NM_SEG_IMAGE == 1 && NM_SEG_PROMPT == 2 && NM_SEG_ANSWER == 3,
               "segment codes");

const char *nm_modality_name(int mod) {
    if (mod >= 0 && mod < NM_MOD_COUNT) return modality_names[mod];
    return mod == NM_MOD_ALL ? "all" : "?";
}

const char *nm_segment_name(int seg) {
    if (seg >= 0 && seg < NM_SEG_COUNT) return segment_names[seg];
    return seg == NM_SEG_ALL ? "all" : "?";
}

// Histogram cell (layer, group, k) of a [L + 1][cols][K + 1] array.
static inline size_t hist_index(const nm_metrics *m, int layer, int cols, int group, int k) {
    return ((size_t)layer * (size_t)cols + (size_t)group) * (size_t)(m->top_k + 1) + (size_t)k;
}

// Σ_k count and Σ_k k·count of one histogram row.
static void hist_row_sums(const long long *row, int top_k, long long *pairs, long long *real) {
    long long p = 0, r = 0;
    for (int k = 0; k <= top_k; k++) {
        p += row[k];
        r += (long long)k * row[k];
    }
    *pairs = p;
    *real = r;
}

nm_status nm_metrics_init(nm_metrics *m, int n_layers, int top_k, nm_error *err) {
    if (!m) return nm_fail(err, NM_ERR_INTERNAL, "nm_metrics_init: NULL metrics");
    memset(m, 0, sizeof *m);
    if (n_layers < 1 || n_layers > NM_MAX_LAYERS)
        return nm_fail(err, NM_ERR_INVALID, "metrics: num_layers %d is outside 1..%d", n_layers,
                       NM_MAX_LAYERS);
    if (top_k < 1 || top_k > NM_METRICS_MAX_TOP_K)
        return nm_fail(err, NM_ERR_INVALID, "metrics: top_k %d is outside 1..%d", top_k,
                       NM_METRICS_MAX_TOP_K);

    // Two allocations: the integer histograms, then the derived per-layer means.
    size_t rows = (size_t)n_layers + 1, bins = (size_t)top_k + 1;
    size_t n_mod_hist = rows * MOD_COLS * bins, n_seg_hist = rows * SEG_COLS * bins;
    long long *counts = calloc(n_mod_hist + n_seg_hist, sizeof *counts);
    double *means = malloc(rows * (MOD_COLS + SEG_COLS) * sizeof *means);
    if (!counts || !means) {
        free(counts);
        free(means);
        return NM_NOMEM(err, "metrics histograms");
    }
    m->n_layers = n_layers;
    m->top_k = top_k;
    m->polarization = counts;
    m->seg_polarization = counts + n_mod_hist;
    m->layer_intensity = means;
    m->layer_seg_intensity = means + rows * MOD_COLS;
    nm_metrics_finish(m); // derived fields as for no tokens
    return NM_OK;
}

void nm_metrics_free(nm_metrics *m) {
    if (!m) return;
    free(m->polarization);    // owns seg_polarization too
    free(m->layer_intensity); // owns layer_seg_intensity too
    memset(m, 0, sizeof *m);
}

// Checks everything add_sample reads, so that a bad sample adds nothing.
static nm_status check_sample(const nm_metrics *m, const nm_trace_sample *s, nm_error *err) {
    if (s->n_layers != m->n_layers || s->top_k != m->top_k)
        return nm_fail(err, NM_ERR_INVALID,
                       "metrics: sample has num_layers %d, top_k %d; expected num_layers %d, top_k %d",
                       s->n_layers, s->top_k, m->n_layers, m->top_k);
    if (s->n_tokens < 0 || s->n_tokens > s->capacity)
        return nm_fail(err, NM_ERR_INVALID, "metrics: sample has n_tokens %d outside 0..capacity %d",
                       s->n_tokens, s->capacity);
    if (s->n_tokens == 0) return NM_OK;
    if (!s->modality || !s->segment || !s->n_real)
        return nm_fail(err, NM_ERR_INVALID, "metrics: sample with %d tokens has no %s array",
                       s->n_tokens, !s->modality ? "modality" : !s->segment ? "segment" : "n_real");
    for (int t = 0; t < s->n_tokens; t++) {
        if (s->modality[t] >= NM_MOD_COUNT)
            return nm_fail(err, NM_ERR_INVALID, "metrics: token %d has unknown modality %d", t,
                           s->modality[t]);
        if (s->segment[t] >= NM_SEG_COUNT)
            return nm_fail(err, NM_ERR_INVALID, "metrics: token %d has unknown segment %d", t,
                           s->segment[t]);
    }
    for (int l = 0; l < s->n_layers; l++) {
        const uint8_t *row = s->n_real + (size_t)l * (size_t)s->capacity;
        for (int t = 0; t < s->n_tokens; t++)
            if (row[t] > s->top_k)
                return nm_fail(err, NM_ERR_INVALID,
                               "metrics: n_real[layer %d][token %d] = %d exceeds top_k %d", l, t,
                               row[t], s->top_k);
    }
    return NM_OK;
}

nm_status nm_metrics_add_sample(nm_metrics *m, const nm_trace_sample *s, nm_error *err) {
    if (!m || !m->polarization || !s)
        return nm_fail(err, NM_ERR_INTERNAL, "nm_metrics_add_sample: NULL or uninitialised argument");
    nm_status st = check_sample(m, s, err);
    if (st != NM_OK) return st;

    for (int t = 0; t < s->n_tokens; t++) {
        m->n_tokens[s->modality[t]]++;
        m->n_seg_tokens[s->segment[t]]++;
    }
    for (int l = 0; l < s->n_layers; l++) {
        const uint8_t *row = s->n_real + (size_t)l * (size_t)s->capacity;
        long long *mod_hist = m->polarization + hist_index(m, l, MOD_COLS, 0, 0);
        long long *seg_hist = m->seg_polarization + hist_index(m, l, SEG_COLS, 0, 0);
        size_t bins = (size_t)m->top_k + 1;
        for (int t = 0; t < s->n_tokens; t++) {
            mod_hist[s->modality[t] * bins + row[t]]++;
            seg_hist[s->segment[t] * bins + row[t]]++;
        }
    }
    m->n_samples++;
    return NM_OK;
}

// Rebuilds the summary column (group = cols − 1, "all") of layers 0…L−1 and the summary row
// (layer L, "all layers") of one histogram from its per-layer, per-group cells.
static void fill_summaries(nm_metrics *m, long long *hist, int cols) {
    int L = m->n_layers, K = m->top_k;
    for (int l = 0; l <= L; l++) {
        long long *all = hist + hist_index(m, l, cols, cols - 1, 0);
        memset(all, 0, (size_t)(K + 1) * sizeof *all);
    }
    long long *total = hist + hist_index(m, L, cols, 0, 0); // row L, all columns
    memset(total, 0, (size_t)cols * (size_t)(K + 1) * sizeof *total);
    for (int l = 0; l < L; l++) {
        long long *all = hist + hist_index(m, l, cols, cols - 1, 0);
        for (int g = 0; g < cols - 1; g++) {
            const long long *cell = hist + hist_index(m, l, cols, g, 0);
            for (int k = 0; k <= K; k++) all[k] += cell[k];
        }
        const long long *layer_row = hist + hist_index(m, l, cols, 0, 0);
        for (size_t i = 0; i < (size_t)cols * (size_t)(K + 1); i++) total[i] += layer_row[i];
    }
}

// means[l][g] = Σ n_real / (K · pairs) for every layer row (including L) and group column.
static void fill_means(const nm_metrics *m, const long long *hist, int cols, double *means) {
    for (int l = 0; l <= m->n_layers; l++)
        for (int g = 0; g < cols; g++) {
            long long pairs, real;
            hist_row_sums(hist + hist_index(m, l, cols, g, 0), m->top_k, &pairs, &real);
            means[(size_t)l * cols + g] = pairs > 0 ? (double)real / ((double)m->top_k * (double)pairs) : NAN;
        }
}

void nm_metrics_finish(nm_metrics *m) {
    if (!m || !m->polarization) return;
    int L = m->n_layers, K = m->top_k;

    m->n_tokens[NM_MOD_ALL] = 0;
    for (int g = 0; g < NM_MOD_COUNT; g++) m->n_tokens[NM_MOD_ALL] += m->n_tokens[g];
    m->n_seg_tokens[NM_SEG_ALL] = 0;
    for (int g = 0; g < NM_SEG_COUNT; g++) m->n_seg_tokens[NM_SEG_ALL] += m->n_seg_tokens[g];

    fill_summaries(m, m->polarization, MOD_COLS);
    fill_summaries(m, m->seg_polarization, SEG_COLS);
    fill_means(m, m->polarization, MOD_COLS, m->layer_intensity);
    fill_means(m, m->seg_polarization, SEG_COLS, m->layer_seg_intensity);

    // Σ n_real over all layers per modality: Σ_t c_t = that / (L·K).
    long long real[MOD_COLS];
    for (int g = 0; g < MOD_COLS; g++) {
        long long pairs;
        hist_row_sums(m->polarization + hist_index(m, L, MOD_COLS, g, 0), K, &pairs, &real[g]);
    }
    long long n_all = m->n_tokens[NM_MOD_ALL];
    m->compute_share_defined = real[NM_MOD_ALL] > 0;
    for (int g = 0; g < MOD_COLS; g++) {
        m->token_share[g] = n_all > 0 ? (double)m->n_tokens[g] / (double)n_all : NAN;
        m->compute_sum[g] = (double)real[g] / ((double)L * (double)K);
        m->compute_share[g] =
            m->compute_share_defined ? (double)real[g] / (double)real[NM_MOD_ALL] : NAN;
        m->intensity[g] = m->layer_intensity[(size_t)L * MOD_COLS + g];
    }
    for (int g = 0; g < SEG_COLS; g++) m->seg_intensity[g] = m->layer_seg_intensity[(size_t)L * SEG_COLS + g];

    long long pairs_all = n_all * L, slots_all = pairs_all * K;
    m->null_slot_ratio = slots_all > 0 ? (double)(slots_all - real[NM_MOD_ALL]) / (double)slots_all : NAN;
    m->zero_compute_ratio = nm_metrics_zero_compute(m, L, NM_MOD_ALL);
}

long long nm_metrics_polarization(const nm_metrics *m, int layer, int mod, int k) {
    if (!m || !m->polarization || layer < 0 || layer > m->n_layers || mod < 0 || mod > NM_MOD_ALL ||
        k < 0 || k > m->top_k)
        return 0;
    return m->polarization[hist_index(m, layer, MOD_COLS, mod, k)];
}

long long nm_metrics_seg_polarization(const nm_metrics *m, int layer, int seg, int k) {
    if (!m || !m->seg_polarization || layer < 0 || layer > m->n_layers || seg < 0 ||
        seg > NM_SEG_ALL || k < 0 || k > m->top_k)
        return 0;
    return m->seg_polarization[hist_index(m, layer, SEG_COLS, seg, k)];
}

long long nm_metrics_pairs(const nm_metrics *m, int layer, int mod) {
    if (!m || !m->polarization || layer < 0 || layer > m->n_layers || mod < 0 || mod > NM_MOD_ALL)
        return 0;
    long long pairs, real;
    hist_row_sums(m->polarization + hist_index(m, layer, MOD_COLS, mod, 0), m->top_k, &pairs, &real);
    return pairs;
}

double nm_metrics_layer_intensity(const nm_metrics *m, int layer, int mod) {
    if (!m || !m->layer_intensity || layer < 0 || layer > m->n_layers || mod < 0 || mod > NM_MOD_ALL)
        return NAN;
    return m->layer_intensity[(size_t)layer * MOD_COLS + mod];
}

double nm_metrics_layer_seg_intensity(const nm_metrics *m, int layer, int seg) {
    if (!m || !m->layer_seg_intensity || layer < 0 || layer > m->n_layers || seg < 0 ||
        seg > NM_SEG_ALL)
        return NAN;
    return m->layer_seg_intensity[(size_t)layer * SEG_COLS + seg];
}

double nm_metrics_zero_compute(const nm_metrics *m, int layer, int mod) {
    long long pairs = nm_metrics_pairs(m, layer, mod);
    if (pairs <= 0) return NAN;
    return (double)nm_metrics_polarization(m, layer, mod, 0) / (double)pairs;
}

nm_status nm_metrics_token_scores(const nm_trace_sample *s, int layer, double *out, nm_error *err) {
    if (!s || (!out && s->n_tokens > 0))
        return nm_fail(err, NM_ERR_INTERNAL, "nm_metrics_token_scores: NULL argument");
    if (s->n_layers < 1 || s->top_k < 1 || s->n_tokens < 0 || s->n_tokens > s->capacity)
        return nm_fail(err, NM_ERR_INVALID,
                       "metrics: sample has num_layers %d, top_k %d, n_tokens %d, capacity %d",
                       s->n_layers, s->top_k, s->n_tokens, s->capacity);
    if (layer < 0 || layer > s->n_layers)
        return nm_fail(err, NM_ERR_INVALID, "metrics: layer %d is outside 0..%d (%d = mean)", layer,
                       s->n_layers, s->n_layers);
    if (s->n_tokens == 0) return NM_OK;
    if (!s->n_real) return nm_fail(err, NM_ERR_INVALID, "metrics: sample has no n_real array");
    int l0 = layer < s->n_layers ? layer : 0, l1 = layer < s->n_layers ? layer + 1 : s->n_layers;
    double denom = (double)s->top_k * (double)(l1 - l0);
    for (int t = 0; t < s->n_tokens; t++) {
        long sum = 0;
        for (int l = l0; l < l1; l++) {
            int r = s->n_real[(size_t)l * (size_t)s->capacity + (size_t)t];
            if (r > s->top_k)
                return nm_fail(err, NM_ERR_INVALID,
                               "metrics: n_real[layer %d][token %d] = %d exceeds top_k %d", l, t, r,
                               s->top_k);
            sum += r;
        }
        out[t] = (double)sum / denom;
    }
    return NM_OK;
}
