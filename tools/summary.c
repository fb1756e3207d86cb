// summary.c — the per-layer, per-modality compute table that `run`, `batch` and `info` print.
#include <math.h>
#include <stdio.h>

#include "cli.h"
#include "nm_metrics.h"

static void cell(FILE *out, double v) {
    if (isnan(v)) fprintf(out, "  %7s", "-");
    else fprintf(out, "  %7.3f", v);
}

void cli_print_summary(const nm_metrics *m, FILE *out) {
    fprintf(out, "tokens     vision %lld | text %lld | special %lld | total %lld\n", m->n_tokens[NM_MOD_VISION],
            m->n_tokens[NM_MOD_TEXT], m->n_tokens[NM_MOD_SPECIAL], m->n_tokens[NM_MOD_ALL]);
    fprintf(out, "compute intensity (mean n_real/K; '-' = no tokens of that kind)\n");
    fprintf(out, "  layer   %7s  %7s  %7s  %7s  %7s\n", "vision", "text", "special", "all", "zero%");
    for (int l = 0; l <= m->n_layers; l++) {
        if (l < m->n_layers) fprintf(out, "  %5d  ", l);
        else fprintf(out, "  %5s  ", "mean");
        cell(out, nm_metrics_layer_intensity(m, l, NM_MOD_VISION));
        cell(out, nm_metrics_layer_intensity(m, l, NM_MOD_TEXT));
        cell(out, nm_metrics_layer_intensity(m, l, NM_MOD_SPECIAL));
        cell(out, nm_metrics_layer_intensity(m, l, NM_MOD_ALL));
        double z = nm_metrics_zero_compute(m, l, NM_MOD_ALL);
        if (isnan(z)) fprintf(out, "  %7s\n", "-");
        else fprintf(out, "  %6.1f%%\n", 100.0 * z);
    }
    fprintf(out, "null slot ratio %.3f   zero-compute ratio %.3f\n", m->null_slot_ratio, m->zero_compute_ratio);
    if (m->compute_share_defined)
        fprintf(out, "compute distribution  vision %.1f%% | text %.1f%% | special %.1f%%\n",
                100 * m->compute_share[NM_MOD_VISION], 100 * m->compute_share[NM_MOD_TEXT],
                100 * m->compute_share[NM_MOD_SPECIAL]);
    else fprintf(out, "compute distribution  undefined (every token routed fully to null)\n");
}
