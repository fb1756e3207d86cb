// nm_eval.c — a model evaluated on a data-set split: accuracy, teacher-forced losses, and the
// compute it spends on background and object patches (nm_eval.h).
#include "nm_eval.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_data.h"
#include "nm_engine.h"
#include "nm_fileutil.h"
#include "nm_generate.h"
#include "nm_rng.h"
#include "nm_sample.h"
#include "nm_tokenizer.h"
#include "nm_trace.h"

_Static_assert((int)NM_EVAL_BG_FLAT == (int)NM_DATA_BG_FLAT && (int)NM_EVAL_BG_TEXTURE == (int)NM_DATA_BG_TEXTURE,
               "patch groups are indexed by the record's background kind");

// The data generator's tasks, listed in this order when present.
static const char *KNOWN_TASKS[] = {"colour", "word", "count", "bar", "text"};
#define N_KNOWN_TASKS ((int)(sizeof KNOWN_TASKS / sizeof KNOWN_TASKS[0]))

// ---------------------------------------------------------------------------------------------
// Patch classification

nm_eval_box nm_eval_box_scale(const int b[4], int data_size, int model_size) {
    if (data_size <= 0 || model_size <= 0) data_size = model_size = 1;
    // x · S / D as one correctly rounded division: exact whenever the result is representable
    const double S = model_size, D = data_size;
    return (nm_eval_box){b[0] * S / D, b[1] * S / D, b[2] * S / D, b[3] * S / D};
}

static int cmp_ll(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static long long gcd_ll(long long a, long long b) {
    while (b) {
        long long t = a % b;
        a = b;
        b = t;
    }
    return a;
}

#define PATCH_STACK_BOXES 32

// Exact integer arithmetic: with g = gcd(S, D), a = S/g, b = D/g, a data coordinate x lies at
// x·a/b model pixels, so in units of 1/b model pixel every edge is an integer (x·a for a box,
// col·p·b for a patch). With S, D <= 8192 and p <= S, a patch side is at most 2^26 units and
// its area at most 2^52: no overflow, no rounding at the "half" and "touches" boundaries.
int nm_eval_patch_class(const int (*bbox)[4], int n, int data_size, int model_size, int patch_size, int row, int col,
                        double *covered) {
    if (covered) *covered = 0;
    if (n < 0 || data_size < 1 || data_size > NM_EVAL_MAX_SIDE || model_size < 1 || model_size > NM_EVAL_MAX_SIDE ||
        patch_size < 1 || patch_size > model_size || row < 0 || col < 0 || (long long)(row + 1) * patch_size > model_size ||
        (long long)(col + 1) * patch_size > model_size)
        return -1;
    const long long g = gcd_ll(model_size, data_size), a = model_size / g, b = data_size / g;
    const long long side = (long long)patch_size * b, px0 = col * side, py0 = row * side, px1 = px0 + side, py1 = py0 + side;
#define OVERLAPS(q) ((q)[0] * a < px1 && (q)[2] * a > px0 && (q)[1] * a < py1 && (q)[3] * a > py0)
    int m = 0;
    for (int i = 0; i < n; i++)
        if (OVERLAPS(bbox[i])) m++;
    if (m == 0) return NM_PATCH_BACKGROUND;
    long long stack[4 * PATCH_STACK_BOXES + 2], *buf = stack;
    if (m > PATCH_STACK_BOXES && !(buf = malloc((size_t)(4 * m + 2) * sizeof *buf))) return -1;
    long long *xs = buf, *iv = buf + 2 * m + 2;
    int nx = 0;
    xs[nx++] = px0;
    xs[nx++] = px1;
    for (int i = 0; i < n; i++) {
        if (!OVERLAPS(bbox[i])) continue;
        const long long x0 = bbox[i][0] * a, x1 = bbox[i][2] * a;
        xs[nx++] = x0 > px0 ? x0 : px0;
        xs[nx++] = x1 < px1 ? x1 : px1;
    }
    qsort(xs, (size_t)nx, sizeof *xs, cmp_ll);
    // Union area by vertical strips: between consecutive x edges the covering boxes do not
    // change; their y intervals are merged.
    long long area = 0;
    for (int s = 0; s + 1 < nx; s++) {
        const long long x = xs[s], w = xs[s + 1] - x;
        if (w <= 0) continue;
        int ni = 0;
        for (int i = 0; i < n; i++) {
            if (!OVERLAPS(bbox[i]) || !(bbox[i][0] * a <= x && x < bbox[i][2] * a)) continue;
            const long long y0 = bbox[i][1] * a, y1 = bbox[i][3] * a;
            iv[2 * ni] = y0 > py0 ? y0 : py0;
            iv[2 * ni + 1] = y1 < py1 ? y1 : py1;
            ni++;
        }
        qsort(iv, (size_t)ni, 2 * sizeof *iv, cmp_ll); // by start
        long long len = 0, lo = 0, hi = 0;
        for (int i = 0; i < ni; i++) {
            if (i == 0 || iv[2 * i] > hi) {
                len += hi - lo;
                lo = iv[2 * i];
                hi = iv[2 * i + 1];
            } else if (iv[2 * i + 1] > hi) {
                hi = iv[2 * i + 1];
            }
        }
        len += hi - lo;
        area += w * len;
    }
#undef OVERLAPS
    if (buf != stack) free(buf);
    if (covered) *covered = (double)area / ((double)side * side);
    return 2 * area >= side * side ? NM_PATCH_OBJECT : NM_PATCH_NEITHER;
}

// ---------------------------------------------------------------------------------------------
// Result bookkeeping

void nm_eval_opts_default(nm_eval_opts *o) {
    memset(o, 0, sizeof *o);
    o->split = "eval";
    o->seed = 1;
    o->max_new_tokens = NM_EVAL_DEFAULT_MAX_NEW;
}

static void compute_free(nm_eval_compute *c) {
    free(c->n_real);
    free(c->layer_score);
    memset(c, 0, sizeof *c);
}

static int compute_init(nm_eval_compute *c, int L) {
    memset(c, 0, sizeof *c);
    c->n_real = calloc((size_t)L, sizeof *c->n_real);
    c->layer_score = calloc((size_t)L, sizeof *c->layer_score);
    c->score = NAN;
    return c->n_real && c->layer_score ? 0 : -1;
}

// Adds token t of a trace.
static void compute_add(nm_eval_compute *c, const nm_trace_sample *tr, int t) {
    c->n++;
    for (int l = 0; l < tr->n_layers; l++) c->n_real[l] += tr->n_real[(size_t)l * tr->capacity + t];
}

static void compute_finish(nm_eval_compute *c, int L, int K) {
    long long sum = 0;
    for (int l = 0; l < L; l++) {
        sum += c->n_real[l];
        c->layer_score[l] = c->n ? (double)c->n_real[l] / ((double)c->n * K) : NAN;
    }
    c->score = c->n ? (double)sum / ((double)c->n * K * L) : NAN;
}

static void task_free(nm_eval_task *t) {
    free(t->name);
    free(t->majority);
    memset(t, 0, sizeof *t);
}

static void task_finish(nm_eval_task *t, int has_baseline) {
    t->accuracy = t->n ? (double)t->n_correct / t->n : NAN;
    t->chance = t->n && has_baseline ? (double)t->n_majority / t->n : NAN;
    t->answer_loss = t->answer_tokens ? t->answer_nll / (double)t->answer_tokens : NAN;
    t->prompt_loss = t->prompt_tokens ? t->prompt_nll / (double)t->prompt_tokens : NAN;
}

void nm_eval_result_free(nm_eval_result *r) {
    if (!r) return;
    free(r->model);
    free(r->data);
    free(r->split);
    task_free(&r->all);
    for (int i = 0; i < r->n_tasks; i++) task_free(&r->tasks[i]);
    free(r->tasks);
    if (r->records)
        for (int i = 0; i < r->n; i++) {
            free(r->records[i].id);
            free(r->records[i].answer);
            free(r->records[i].generated);
        }
    free(r->records);
    for (int g = 0; g < NM_EVAL_BG_GROUPS; g++) {
        compute_free(&r->background[g]);
        compute_free(&r->object[g]);
    }
    compute_free(&r->vision);
    compute_free(&r->text);
    memset(r, 0, sizeof *r);
}

static char *dup_str(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

// ---------------------------------------------------------------------------------------------
// Majority baseline: the most frequent answer of each task in the train split.

typedef struct {
    const char *task, *answer;
} task_answer;

static int cmp_task_answer(const void *a, const void *b) {
    const task_answer *x = a, *y = b;
    int c = strcmp(x->task, y->task);
    return c ? c : strcmp(x->answer, y->answer);
}

static int task_index(const nm_eval_result *r, const char *name) {
    for (int i = 0; i < r->n_tasks; i++)
        if (!strcmp(r->tasks[i].name, name)) return i;
    return -1;
}

// Fills tasks[i].majority for every task of the result that the train split has.
static nm_status majority_answers(nm_eval_result *r, const nm_dataset *train, nm_error *err) {
    if (train->n == 0) return NM_OK;
    task_answer *ta = malloc((size_t)train->n * sizeof *ta);
    if (!ta) return NM_NOMEM(err, "the baseline");
    for (int i = 0; i < train->n; i++) ta[i] = (task_answer){train->rec[i].task, train->rec[i].answer};
    qsort(ta, (size_t)train->n, sizeof *ta, cmp_task_answer);
    nm_status st = NM_OK;
    // Sorted by task then answer: one pass over the runs of equal (task, answer); within a
    // task the first largest run wins, i.e. ties go to the smallest answer.
    int best = 0;
    const char *best_answer = NULL;
    for (int i = 0; i < train->n && st == NM_OK;) {
        int j = i + 1;
        while (j < train->n && !cmp_task_answer(&ta[i], &ta[j])) j++;
        if (j - i > best) {
            best = j - i;
            best_answer = ta[i].answer;
        }
        if (j == train->n || strcmp(ta[j].task, ta[i].task)) { // the task's last run
            const int k = task_index(r, ta[i].task);
            if (k >= 0 && !(r->tasks[k].majority = dup_str(best_answer))) st = NM_NOMEM(err, "the baseline");
            best = 0;
            best_answer = NULL;
        }
        i = j;
    }
    free(ta);
    return st;
}

// ---------------------------------------------------------------------------------------------
// One record

typedef struct {
    const nm_model *m;
    nm_engine *engine;
    float *logits; // (T, V)
    size_t logits_cap;
    int (*boxes)[4]; // the record's bboxes
    int boxes_cap;
    unsigned char *bytes; // generated bytes
    int bytes_cap;
    int max_new, data_image_size;
    const char *info_path; // DATA/info.json, for messages
} eval_ctx;

// An engine that holds `need` tokens (nm_generate's sizing rule, so the two share one engine).
static nm_status ensure_engine(eval_ctx *c, int need, nm_error *err) {
    if (c->engine && nm_engine_capacity(c->engine) >= need) return NM_OK;
    const int P = c->m->cfg.max_positions;
    int want = need > 1024 ? need : (P < 1024 ? P : 1024);
    nm_engine_free(c->engine);
    c->engine = NULL;
    return nm_engine_create(&c->engine, c->m, want, err);
}

// −log softmax(x)[target], in double.
static double token_nll(const float *x, int V, int target) {
    float mx = x[0];
    for (int i = 1; i < V; i++)
        if (x[i] > mx) mx = x[i];
    double s = 0;
    for (int i = 0; i < V; i++) s += exp((double)x[i] - mx);
    return (double)mx + log(s) - x[target];
}

// Checks an image record's ground truth against its decoded image and copies its bboxes.
static nm_status prepare_boxes(eval_ctx *c, const nm_data_record *rec, const nm_trace_sample *tr, nm_error *err) {
    const int W = tr->image_width, H = tr->image_height;
    if (W != H)
        return nm_fail(err, NM_ERR_INVALID,
                       "record %s: image %s is %dx%d, not square: its bboxes cannot be placed on the model's patches", rec->id,
                       rec->image, W, H);
    if (c->data_image_size && W != c->data_image_size)
        return nm_fail(err, NM_ERR_INVALID, "record %s: image %s is %dx%d but %s gives image_size %d", rec->id, rec->image, W, H,
                       c->info_path, c->data_image_size);
    if (rec->n_objects > c->boxes_cap) {
        int(*nb)[4] = realloc(c->boxes, (size_t)rec->n_objects * sizeof *nb);
        if (!nb) return NM_NOMEM(err, "bboxes");
        c->boxes = nb;
        c->boxes_cap = rec->n_objects;
    }
    for (int i = 0; i < rec->n_objects; i++) {
        const int *b = rec->objects[i].bbox;
        if (b[2] > W || b[3] > H)
            return nm_fail(err, NM_ERR_INVALID, "record %s: objects[%d] bbox [%d, %d, %d, %d] lies outside the %dx%d image %s",
                           rec->id, i, b[0], b[1], b[2], b[3], W, H, rec->image);
        memcpy(c->boxes[i], b, sizeof c->boxes[i]);
    }
    return NM_OK;
}

static nm_status eval_record(eval_ctx *c, nm_eval_result *r, const nm_data_record *rec, nm_eval_record *out,
                             nm_error *err) {
    const nm_config *cfg = &c->m->cfg;
    const int V = cfg->vocab_size;
    nm_sample s;
    nm_trace_sample tr;
    memset(&tr, 0, sizeof tr);
    nm_status st = nm_sample_build(&s, cfg, rec, err);
    if (st != NM_OK) return st;

    // 1–2. Teacher-forced losses: one forward over the whole sample, every position's logits.
    const int T = s.seq.n;
    if ((st = ensure_engine(c, T, err)) != NM_OK) goto out;
    if ((size_t)T * V > c->logits_cap) {
        float *nl = realloc(c->logits, (size_t)T * V * sizeof *nl);
        if (!nl) {
            st = NM_NOMEM(err, "logits");
            goto out;
        }
        c->logits = nl;
        c->logits_cap = (size_t)T * V;
    }
    nm_engine_reset(c->engine);
    if ((st = nm_engine_forward(c->engine, s.seq.id, s.seq.patch, s.pixels, T, c->logits, 1, NULL, err)) != NM_OK) goto out;
    double nll[3] = {0, 0, 0};
    int cnt[3] = {0, 0, 0};
    for (int t = 0; t < T; t++) {
        const int k = s.loss_kind[t];
        if (k == NM_LOSS_NONE) continue;
        nll[k] += token_nll(c->logits + (size_t)t * V, V, s.target[t]);
        cnt[k]++;
    }
    out->answer_tokens = cnt[NM_LOSS_ANSWER];
    out->prompt_tokens = cnt[NM_LOSS_PROMPT];
    out->answer_loss = cnt[NM_LOSS_ANSWER] ? nll[NM_LOSS_ANSWER] / cnt[NM_LOSS_ANSWER] : NAN;
    out->prompt_loss = cnt[NM_LOSS_PROMPT] ? nll[NM_LOSS_PROMPT] / cnt[NM_LOSS_PROMPT] : NAN;

    // 3. Greedy answer, the `nullmap run` path; its trace holds the prefill's routing.
    nm_request req = {.prompt = rec->prompt, .image_path = rec->image, .max_new_tokens = c->max_new};
    if ((st = nm_generate(c->m, &c->engine, &req, &tr, err)) != NM_OK) goto out;
    const int n_prompt = tr.n_prompt_tokens, n_gen = tr.n_tokens - n_prompt;
    if (n_gen + 1 > c->bytes_cap) {
        unsigned char *nb = realloc(c->bytes, (size_t)n_gen + 1);
        if (!nb) {
            st = NM_NOMEM(err, "the answer");
            goto out;
        }
        c->bytes = nb;
        c->bytes_cap = n_gen + 1;
    }
    int nb = 0, special = 0;
    for (int t = n_prompt; t < tr.n_tokens; t++) {
        const int id = tr.token_id[t];
        if (id == cfg->tok.eos) {
            out->stopped = 1;
            break;
        }
        if (id < 0 || id > 255) special = 1;
        else c->bytes[nb++] = (unsigned char)id;
    }
    int lead = 0;
    while (lead < nb && c->bytes[lead] == ' ') lead++;
    const size_t alen = strlen(rec->answer);
    out->correct = !special && (size_t)(nb - lead) == alen && !memcmp(c->bytes + lead, rec->answer, alen);
    const char *shown = tr.answer ? tr.answer : "";
    while (*shown == ' ') shown++;
    if (!(out->generated = dup_str(shown))) {
        st = NM_NOMEM(err, "the answer");
        goto out;
    }

    // 4. Background and object patches of an image with ground truth.
    if (rec->image) r->n_image_records++;
    if (rec->image && rec->has_objects) {
        if ((st = prepare_boxes(c, rec, &tr, err)) != NM_OK) goto out;
        r->n_truth_records++;
        for (int t = 0; t < n_prompt; t++) {
            if (tr.modality[t] != NM_MOD_VISION) continue;
            const int cls = nm_eval_patch_class((const int(*)[4])c->boxes, rec->n_objects, tr.image_width, cfg->image_size,
                                                cfg->patch_size, tr.patch[2 * t], tr.patch[2 * t + 1], NULL);
            if (cls < 0) {
                st = NM_NOMEM(err, "patch classification");
                goto out;
            }
            if (cls == NM_PATCH_NEITHER) {
                r->n_neither++;
                continue;
            }
            nm_eval_compute *g = cls == NM_PATCH_BACKGROUND ? r->background : r->object;
            compute_add(&g[NM_EVAL_BG_ALL], &tr, t);
            if (rec->background == NM_DATA_BG_FLAT || rec->background == NM_DATA_BG_TEXTURE)
                compute_add(&g[rec->background], &tr, t);
        }
    }
    // 5. Modality intensity of the prefill.
    for (int t = 0; t < n_prompt; t++) {
        if (tr.modality[t] == NM_MOD_VISION) compute_add(&r->vision, &tr, t);
        else if (tr.segment[t] == NM_SEG_PROMPT) compute_add(&r->text, &tr, t);
    }

    nm_eval_task *task = &r->tasks[out->task];
    task->n++;
    task->n_correct += out->correct;
    task->answer_nll += nll[NM_LOSS_ANSWER];
    task->prompt_nll += nll[NM_LOSS_PROMPT];
    task->answer_tokens += cnt[NM_LOSS_ANSWER];
    task->prompt_tokens += cnt[NM_LOSS_PROMPT];
    if (task->majority && !strcmp(rec->answer, task->majority)) task->n_majority++;
out:
    nm_sample_free(&s);
    nm_trace_sample_free(&tr);
    return st;
}

// ---------------------------------------------------------------------------------------------
// The run

// The task list: the known tasks present, in their order, then the others as they appear.
static nm_status build_tasks(nm_eval_result *r, const nm_dataset *ds, const int *sel, int n, nm_error *err) {
    r->tasks = calloc((size_t)n + N_KNOWN_TASKS, sizeof *r->tasks);
    if (!r->tasks) return NM_NOMEM(err, "tasks");
    for (int k = 0; k < N_KNOWN_TASKS + 1; k++)
        for (int i = 0; i < n; i++) {
            const char *name = ds->rec[sel[i]].task;
            int known = -1;
            for (int q = 0; q < N_KNOWN_TASKS; q++)
                if (!strcmp(name, KNOWN_TASKS[q])) known = q;
            if (k < N_KNOWN_TASKS ? known != k : known >= 0) continue;
            if (task_index(r, name) >= 0) continue;
            if (!(r->tasks[r->n_tasks].name = dup_str(name))) return NM_NOMEM(err, "tasks");
            r->n_tasks++;
            if (k < N_KNOWN_TASKS) break;
        }
    return NM_OK;
}

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

// Which records: all, the first `limit`, or `limit` drawn with the seed (in file order).
static nm_status select_records(int **sel, int *n, int n_split, const nm_eval_opts *o, nm_error *err) {
    *n = o->limit > 0 && o->limit < n_split ? o->limit : n_split;
    *sel = malloc((size_t)(n_split > 0 ? n_split : 1) * sizeof **sel);
    if (!*sel) return NM_NOMEM(err, "the record list");
    for (int i = 0; i < n_split; i++) (*sel)[i] = i;
    if (o->sample && *n < n_split) {
        nm_rng rng;
        nm_rng_seed(&rng, o->seed ^ 0x6576616c73756273ULL); // "evalsubs"
        for (int i = 0; i < *n; i++) { // partial Fisher–Yates
            int j = i + (int)(nm_rng_next(&rng) % (uint64_t)(n_split - i)), t = (*sel)[i];
            (*sel)[i] = (*sel)[j];
            (*sel)[j] = t;
        }
        qsort(*sel, (size_t)*n, sizeof **sel, cmp_int); // back to file order
    }
    return NM_OK;
}

nm_status nm_eval_run(nm_eval_result *r, const nm_model *m, const char *data_dir, const nm_eval_opts *o_in,
                      nm_error *err) {
    memset(r, 0, sizeof *r);
    nm_eval_opts o;
    if (o_in) o = *o_in;
    else nm_eval_opts_default(&o);
    if (!o.split) o.split = "eval";
    if (o.max_new_tokens < 1)
        return nm_fail(err, NM_ERR_INVALID, "the answer budget (max_new_tokens) must be >= 1, got %d", o.max_new_tokens);
    if (o.limit < 0) return nm_fail(err, NM_ERR_INVALID, "limit must be >= 0, got %d", o.limit);
    const nm_config *cfg = &m->cfg;
    const int L = cfg->num_layers, K = cfg->moe.top_k;
    nm_dataset ds = {0}, train_ds = {0};
    const nm_dataset *train = &ds;
    eval_ctx c = {0};
    int *sel = NULL, n = 0;
    char *split_path = NULL, *info_path = NULL;
    nm_status st;
    if ((st = nm_dataset_load(&ds, data_dir, o.split, err)) != NM_OK) goto fail;
    if (strcmp(o.split, "train")) {
        if ((st = nm_dataset_load(&train_ds, data_dir, "train", err)) != NM_OK) {
            nm_error_prefix(err, "the majority baseline needs the train split");
            goto fail;
        }
        train = &train_ds;
    }
    {
        char name[16];
        snprintf(name, sizeof name, "%s.jsonl", o.split);
        split_path = nm_path_join(data_dir, name);
        info_path = nm_path_join(data_dir, "info.json");
        if (!split_path || !info_path) {
            st = NM_NOMEM(err, "a path");
            goto fail;
        }
    }
    if (ds.n == 0) {
        st = nm_fail(err, NM_ERR_INVALID, "%s: no records to evaluate", split_path);
        goto fail;
    }
    if ((st = select_records(&sel, &n, ds.n, &o, err)) != NM_OK) goto fail;

    r->model = dup_str(o.model_name ? o.model_name : "");
    r->data = dup_str(data_dir);
    r->split = dup_str(o.split);
    r->all.name = dup_str("all");
    r->records = calloc((size_t)n, sizeof *r->records);
    if (!r->model || !r->data || !r->split || !r->all.name || !r->records) {
        st = NM_NOMEM(err, "the result");
        goto fail;
    }
    r->n_split = ds.n;
    r->n = n;
    r->limit = o.limit;
    r->sample = o.sample && n < ds.n; // a subset was drawn
    r->seed = o.seed;
    r->max_new_tokens = o.max_new_tokens;
    r->n_layers = L;
    r->top_k = K;
    r->model_image_size = cfg->has_vision ? cfg->image_size : 0;
    r->patch_size = cfg->has_vision ? cfg->patch_size : 0;
    r->data_image_size = ds.image_size;
    for (int g = 0; g < NM_EVAL_BG_GROUPS; g++)
        if (compute_init(&r->background[g], L) || compute_init(&r->object[g], L)) {
            st = NM_NOMEM(err, "the result");
            goto fail;
        }
    if (compute_init(&r->vision, L) || compute_init(&r->text, L)) {
        st = NM_NOMEM(err, "the result");
        goto fail;
    }
    if ((st = build_tasks(r, &ds, sel, n, err)) != NM_OK) goto fail;
    if ((st = majority_answers(r, train, err)) != NM_OK) goto fail;

    c.m = m;
    c.max_new = o.max_new_tokens;
    c.data_image_size = ds.image_size;
    c.info_path = info_path;
    if (o.progress) o.progress(o.progress_ctx, 0, n);
    for (int i = 0; i < n; i++) {
        const nm_data_record *rec = &ds.rec[sel[i]];
        nm_eval_record *out = &r->records[i];
        out->task = task_index(r, rec->task);
        if (!(out->id = dup_str(rec->id)) || !(out->answer = dup_str(rec->answer))) {
            st = NM_NOMEM(err, "the result");
            goto fail;
        }
        if ((st = eval_record(&c, r, rec, out, err)) != NM_OK) {
            nm_error_prefix(err, "%s:%d", split_path, sel[i] + 1); // one record per line
            goto fail;
        }
        if (o.progress) o.progress(o.progress_ctx, i + 1, n);
    }

    // Totals and derived values.
    int any_baseline = 0;
    for (int k = 0; k < r->n_tasks; k++) {
        nm_eval_task *t = &r->tasks[k];
        task_finish(t, t->majority != NULL);
        any_baseline |= t->majority != NULL;
        r->all.n += t->n;
        r->all.n_correct += t->n_correct;
        r->all.n_majority += t->n_majority;
        r->all.answer_nll += t->answer_nll;
        r->all.prompt_nll += t->prompt_nll;
        r->all.answer_tokens += t->answer_tokens;
        r->all.prompt_tokens += t->prompt_tokens;
    }
    task_finish(&r->all, any_baseline);
    for (int g = 0; g < NM_EVAL_BG_GROUPS; g++) {
        compute_finish(&r->background[g], L, K);
        compute_finish(&r->object[g], L, K);
    }
    compute_finish(&r->vision, L, K);
    compute_finish(&r->text, L, K);
    st = NM_OK;
    goto out;
fail:
    nm_eval_result_free(r);
out:
    nm_engine_free(c.engine);
    free(c.logits);
    free(c.boxes);
    free(c.bytes);
    free(sel);
    free(split_path);
    free(info_path);
    nm_dataset_free(&ds);
    nm_dataset_free(&train_ds);
    return st;
}

// ---------------------------------------------------------------------------------------------
// JSON

// A number, or null where it does not exist.
static json_t *num(double v) { return isfinite(v) ? json_real(v) : json_null(); }

static json_t *compute_json(const nm_eval_compute *c, int L) {
    json_t *layers = json_array();
    for (int l = 0; l < L; l++) json_array_append_new(layers, num(c->layer_score[l]));
    return json_pack("{s:I, s:o, s:o}", "n", (json_int_t)c->n, "score", num(c->score), "layers", layers);
}

static json_t *task_json(const nm_eval_task *t) {
    return json_pack("{s:s, s:i, s:i, s:o, s:o, s:o, s:i, s:o, s:I, s:o, s:I}", "task", t->name, "n", t->n, "correct",
                     t->n_correct, "accuracy", num(t->accuracy), "chance", num(t->chance), "majority_answer",
                     t->majority ? json_string(t->majority) : json_null(), "majority_hits", t->n_majority, "answer_loss",
                     num(t->answer_loss), "answer_tokens", (json_int_t)t->answer_tokens, "prompt_loss",
                     num(t->prompt_loss), "prompt_tokens", (json_int_t)t->prompt_tokens);
}

static const char *GROUP_NAMES[NM_EVAL_BG_GROUPS] = {"all", "flat", "texture"};

nm_status nm_eval_json(const nm_eval_result *r, char **text, nm_error *err) {
    *text = NULL;
    const int L = r->n_layers;
    const char *paths[2] = {r->model, r->data};
    for (int i = 0; i < 2; i++)
        if (!nm_utf8_valid(paths[i], strlen(paths[i]), NULL))
            return nm_fail(err, NM_ERR_INVALID, "%s: the path is not valid UTF-8 and cannot be written to JSON", paths[i]);
    json_t *defs = json_pack(
        "{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "accuracy",
        "share of records whose greedy answer (generated bytes before EOS, leading spaces removed) equals the record's answer",
        "chance",
        "majority baseline: accuracy of always answering, for each task, the most frequent answer of that task in the train split",
        "answer_loss",
        "teacher-forced cross-entropy (natural log) of the answer targets (space, answer bytes, EOS), mean over tokens",
        "prompt_loss", "teacher-forced cross-entropy (natural log) of the prompt-byte targets, mean over tokens", "score",
        "mean over MoE layers and tokens of n_real/K in the prefill (layers: per MoE layer)", "background",
        "image patches whose pixel square overlaps no object bbox (bboxes scaled to the model's image size)", "object",
        "image patches at least half covered by the union of the object bboxes", "text", "prompt-byte tokens");
    json_t *tasks = json_array();
    for (int k = 0; k < r->n_tasks; k++) json_array_append_new(tasks, task_json(&r->tasks[k]));
    json_t *groups = json_object();
    for (int g = 0; g < NM_EVAL_BG_GROUPS; g++)
        json_object_set_new(groups, GROUP_NAMES[g],
                            json_pack("{s:o, s:o}", "background", compute_json(&r->background[g], L), "object",
                                      compute_json(&r->object[g], L)));
    json_t *patches = json_pack("{s:i, s:i, s:I, s:o}", "image_records", r->n_image_records, "classified_records",
                                r->n_truth_records, "neither", (json_int_t)r->n_neither, "groups", groups);
    json_t *records = json_array();
    for (int i = 0; i < r->n; i++) {
        const nm_eval_record *e = &r->records[i];
        json_array_append_new(records,
                              json_pack("{s:s, s:s, s:s, s:s, s:b, s:b, s:o, s:i, s:o, s:i}", "id", e->id, "task",
                                        r->tasks[e->task].name, "answer", e->answer, "generated", e->generated,
                                        "stopped", e->stopped, "correct", e->correct, "answer_loss", num(e->answer_loss),
                                        "answer_tokens", e->answer_tokens, "prompt_loss", num(e->prompt_loss),
                                        "prompt_tokens", e->prompt_tokens));
    }
    json_t *seed = !r->sample ? json_null()
                   : r->seed <= (uint64_t)INT64_MAX ? json_integer((json_int_t)r->seed)
                                                    : json_real((double)r->seed);
    json_t *modality = json_pack("{s:o, s:o}", "vision", compute_json(&r->vision, L), "text", compute_json(&r->text, L));
    json_t *root = json_pack(
        "{s:s, s:i, s:s, s:s, s:s, s:i, s:i, s:o, s:b, s:o, s:i, s:i, s:i, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", //
        "format", "nullmap-eval", "format_version", NM_EVAL_FORMAT_VERSION, "model", r->model, "data", r->data, "split",
        r->split, "n_split", r->n_split, "n", r->n, "limit", r->limit > 0 ? json_integer(r->limit) : json_null(),
        "random_subset", r->sample, "seed", seed, "max_new_tokens", r->max_new_tokens, "num_layers", r->n_layers, "top_k",
        r->top_k, "model_image_size", r->model_image_size ? json_integer(r->model_image_size) : json_null(),
        "data_image_size", r->data_image_size ? json_integer(r->data_image_size) : json_null(), "definitions", defs,
        "overall", task_json(&r->all), "tasks", tasks, "patches", patches, "modality", modality, "records", records);
    char *s = root ? json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17)) : NULL;
    json_decref(root);
    if (!s) return NM_NOMEM(err, "the JSON report");
    size_t len = strlen(s);
    char *t = realloc(s, len + 2);
    if (!t) {
        free(s);
        return NM_NOMEM(err, "the JSON report");
    }
    t[len] = '\n';
    t[len + 1] = '\0';
    *text = t;
    return NM_OK;
}

nm_status nm_eval_write_json(const nm_eval_result *r, const char *path, nm_error *err) {
    char *text;
    nm_status st = nm_eval_json(r, &text, err);
    if (st != NM_OK) return st;
    st = nm_write_file_atomic(path, text, strlen(text), err);
    free(text);
    return st;
}
