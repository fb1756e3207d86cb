// nm_train_model.c — the whole model's training forward and backward (nm_train_model.h) in
// float64 and float32, both built from nm_train_model_generic.h, and the parameter layout.
#include "nm_train_model.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_model.h"
#include "nm_sample.h"
#include "nm_trace.h"
#include "nm_train_ops.h"

void nm_param_layout_free(nm_param_layout *pl) {
    free(pl->layer);
    memset(pl, 0, sizeof *pl);
}

nm_status nm_param_layout_init(nm_param_layout *pl, const nm_config *cfg, nm_error *err) {
    // The layout is nm_model's: allocate one (zeros) and read where its tensors landed.
    memset(pl, 0, sizeof *pl);
    nm_model m;
    nm_status s = nm_model_init_zero(&m, cfg, err);
    if (s != NM_OK) return s;
    pl->layer = calloc((size_t)cfg->num_layers, sizeof *pl->layer);
    if (!pl->layer) {
        nm_model_free(&m);
        return NM_NOMEM(err, "parameter layout");
    }
    pl->cfg = *cfg;
    pl->len = m.arena_len;
#define OFF(ptr) ((ptr) ? (size_t)((ptr) - m.arena) : NM_NO_TENSOR)
    pl->embed = OFF(m.embed);
    pl->patch_w = OFF(m.patch_w);
    pl->patch_b = OFF(m.patch_b);
    pl->pos_embed = OFF(m.pos_embed);
    pl->norm = OFF(m.norm);
    pl->lm_head = OFF(m.lm_head);
    for (int l = 0; l < cfg->num_layers; l++) {
        const nm_layer_weights *w = &m.layers[l];
        pl->layer[l] = (nm_layer_offsets){OFF(w->attn_norm), OFF(w->wq),      OFF(w->wk),        OFF(w->wv),
                                          OFF(w->wo),        OFF(w->moe_norm), OFF(w->moe.router), OFF(w->moe.gate),
                                          OFF(w->moe.up),    OFF(w->moe.down), OFF(w->moe.sh_gate),
                                          OFF(w->moe.sh_up), OFF(w->moe.sh_down)};
    }
#undef OFF
    nm_model_free(&m);
    return NM_OK;
}

#define R double
#define FN(name) name##_f64
#define GEMM cblas_dgemm
#include "nm_train_model_generic.h"
#undef R
#undef FN
#undef GEMM

#define R float
#define FN(name) name##_f32
#define GEMM cblas_sgemm
#include "nm_train_model_generic.h"
#undef R
#undef FN
#undef GEMM
