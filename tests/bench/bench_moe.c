// bench_moe.c — nullmap's speed bench: every bar item is a ratio of times measured side by side
// in this one run (never an absolute-time assert). Prints a table with PASS/FAIL per item and
// exits 0 whatever the outcome: it reports, it does not test.
//
//   make bench [BENCH_ARGS="--reps 15"]       (runs build/bench_moe with the settings below)
//   build/bench_moe [--no-torch] [--reps N] [--only moe|trace|torch|prefill]
//
// Reference shape: one MoE layer, D = 512, H = 256, N = 64 SwiGLU experts, no shared expert,
// F32, both cores. K^k_rho = top-k with M = N(1-rho)/rho null copies. Times are medians of
// --reps runs after 2 warm-ups; cases compared with each other run interleaved (round robin).
//
// Routing: a random router puts only a few % of slots on nulls (FINDINGS.md), so the inputs
// carry a constant feature (column D-1 = 1) that only the null row of the router reads: its
// weight there is a bias b on the null logit. b is set per config by bisection so that the
// share of null slots on these inputs is 1 - rho; the achieved share is printed.
//
// Sections: (moe) the five configs at T = 2048 and 256, and cblas_sgemm 2048^3 in the same
// rounds for the floor; (trace) nm_moe_forward with routing written into a trace sample vs
// the workspace, and bitwise repeatability; (torch) tests/bench/torch_alg1.py as a server,
// taking turns with nullmap; (prefill) a 4-layer model, 1000 tokens in one call vs one by
// one, and the engine with/without a trace. Threads: OMP_NUM_THREADS=2 with libgomp's default
// wait policy for nullmap (Makefile BENCH_ENV explains why); PyTorch gets 2 threads and
// OMP_WAIT_POLICY=PASSIVE (its best setting here, FINDINGS.md). Each section prints how much
// of the machine other processes used meanwhile: the bench shares its two cores.
#define _GNU_SOURCE
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nm_engine.h"
#include "nm_model.h"
#include "nm_moe.h"
#include "nm_rng.h"
#include "nm_optim.h"
#include "nm_sample.h"
#include "nm_trace.h"
#include "nm_train_model.h"

enum { D = 512, H = 256, N = 64, T_BIG = 2048, T_SMALL = 256 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    double *c = malloc((size_t)n * sizeof *c);
    memcpy(c, v, (size_t)n * sizeof *c);
    qsort(c, (size_t)n, sizeof *c, cmp_double);
    double m = n % 2 ? c[n / 2] : 0.5 * (c[n / 2 - 1] + c[n / 2]);
    free(c);
    return m;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "bench_moe: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    memset(p, 0, n); // touch every page now, not inside a timed region
    return p;
}

static void fill_normal(float *x, size_t n, float sd, uint64_t seed) {
    nm_rng r;
    nm_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) x[i] = sd * (float)nm_rng_normal(&r);
}

// ---- how busy the machine was with other work (the bench shares it) ----

typedef struct {
    double wall;
    unsigned long long busy, mine; // clock ticks: all CPUs busy; this process + waited-for children
} load_mark;

static load_mark load_now(void) {
    load_mark m = {now_s(), 0, 0};
    unsigned long long v[10] = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (f) {
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                   &v[7]) == 8)
            m.busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]; // user nice system irq softirq steal
        fclose(f);
    }
    f = fopen("/proc/self/stat", "r");
    if (f) {
        char buf[1024];
        if (fgets(buf, sizeof buf, f)) {
            const char *p = strrchr(buf, ')'); // fields after the command name
            unsigned long long ut = 0, st = 0, cut = 0, cst = 0;
            if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %llu %llu", &ut, &st, &cut,
                            &cst) == 4)
                m.mine = ut + st + cut + cst;
        }
        fclose(f);
    }
    return m;
}

// Share of the machine's CPUs used by other processes between a and b, in percent.
static double other_load(load_mark a, load_mark b) {
    double hz = (double)sysconf(_SC_CLK_TCK), ncpu = (double)sysconf(_SC_NPROCESSORS_ONLN);
    double other = (double)(b.busy - a.busy) - (double)(b.mine - a.mine);
    double cap = (b.wall - a.wall) * hz * ncpu;
    return cap > 0 ? fmax(0.0, 100.0 * other / cap) : 0.0;
}

// ---- the table of bar items ----

typedef struct {
    char name[96], measured[96], bar[48];
    int status; // 1 pass, 0 fail, -1 skipped, 2 a measurement the bar asks to report
} bar_item;
static bar_item items[16];
static int n_items;

static void add_item(const char *name, const char *bar, int status, const char *fmt, double a, double b) {
    bar_item *it = &items[n_items++];
    snprintf(it->name, sizeof it->name, "%s", name);
    snprintf(it->bar, sizeof it->bar, "%s", bar);
    snprintf(it->measured, sizeof it->measured, fmt, a, b);
    it->status = status;
}

// ---- 1. the machine: cblas_sgemm at 2048^3 (2 threads, OpenBLAS's own threading) ----

enum { SG = 2048 };
static float *SA, *SB, *SC;

static double sgemm_once(void) {
    double t0 = now_s();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, SG, SG, SG, 1.0f, SA, SG, SB, SG, 0.0f, SC, SG);
    return now_s() - t0;
}

static double sgemm_gflops(double seconds) { return 2.0 * SG * SG * (double)SG / seconds / 1e9; }

// ---- the machine's memory: one streaming read of a buffer (2 threads), GB/s ----
// At T = 256 each expert sees ~8 tokens, so the layer must read all 64 experts' weights
// (100 MB) from memory whatever the arithmetic: this rate gives that floor. Scalar 64-bit
// loads in four chains are faster than memory on this machine, so the loop measures memory.
static volatile uint64_t stream_sink;
static double stream_read_s(const void *buf, size_t bytes) {
    const uint64_t *p = buf;
    const size_t n = bytes / 32;
    uint64_t acc = 0;
    double t0 = now_s();
    #pragma omp parallel for schedule(static) reduction(^ : acc)
    for (size_t i = 0; i < n; i++) acc ^= p[4 * i] + p[4 * i + 1] + p[4 * i + 2] + p[4 * i + 3];
    double t = now_s() - t0;
    stream_sink = acc; // keeps the loop
    return t;
}

// ---- 2. one MoE layer ----

typedef struct {
    const char *name;
    int K, M;
    double rho, bias, null_share, null_share_small;
    nm_moe_config mc;
    float *router; // (N+1, D)
} moe_case;

static nm_moe_weights W;
static float *Y;  // (T_BIG, D) inputs; column D-1 = 1 (the bias feature)
static float *OUT; // (T_BIG, D)
static float *Z;   // (T_BIG, N+1) router logits of the reals (null column set per case)

// Share of the T*K slots that go to a null copy when the null logit is b.
static double null_share(moe_case *c, double b, int T, nm_routing *rt) {
    for (int t = 0; t < T; t++) Z[(size_t)t * (N + 1) + N] = (float)b;
    moe_route_null(rt, Z, T, &c->mc);
    long real = 0;
    for (int t = 0; t < T; t++) real += rt->n_real[t];
    return 1.0 - (double)real / ((double)T * c->K);
}

static void setup_case(moe_case *c, const float *router_base) {
    c->mc = (nm_moe_config){.num_experts = N, .null_copies = c->M, .top_k = c->K, .expert_hidden = H,
                            .shared_expert_hidden = 0, .null_kind = NM_NULL_ZERO};
    c->rho = (double)N / (N + c->M);
    c->router = xmalloc((size_t)(N + 1) * D * sizeof(float));
    memcpy(c->router, router_base, (size_t)(N + 1) * D * sizeof(float));
    nm_routing rt = {xmalloc(T_BIG), xmalloc((size_t)T_BIG * c->K * 2), xmalloc((size_t)T_BIG * c->K * 4),
                     xmalloc((size_t)T_BIG * c->K * 4), xmalloc(T_BIG * 4), xmalloc(T_BIG * 4)};
    double b = 0.0;
    if (c->M > 0) { // bisection: the null share rises with b
        double lo = -8.0, hi = 8.0, target = 1.0 - c->rho;
        for (int i = 0; i < 40; i++) {
            double mid = 0.5 * (lo + hi);
            if (null_share(c, mid, T_BIG, &rt) < target) lo = mid;
            else hi = mid;
        }
        b = 0.5 * (lo + hi);
    }
    c->bias = b;
    c->router[(size_t)N * D + D - 1] = (float)b;
    c->null_share = null_share(c, b, T_BIG, &rt);
    c->null_share_small = null_share(c, b, T_SMALL, &rt);
    free(rt.n_real); free(rt.slot); free(rt.prob); free(rt.gate); free(rt.null_mass); free(rt.lse);
}

static double moe_once(moe_case *c, int T, nm_moe_workspace *ws, const nm_routing *rt) {
    nm_moe_weights w = W;
    w.router = c->router;
    nm_error err = {0};
    double t0 = now_s();
    if (nm_moe_forward(OUT, Y, &w, &c->mc, T, D, ws, rt, &err) != NM_OK) {
        fprintf(stderr, "bench_moe: nm_moe_forward failed\n");
        exit(1);
    }
    return now_s() - t0;
}

// Times the cases interleaved (round robin, so that drift of the machine hits all alike):
// 2 warm-up rounds, then `reps` rounds; ms[c] = median. With sgemm_ms, each round also runs
// one cblas_sgemm 2048^3, so that the machine's rate is measured under the same conditions.
static void time_cases(moe_case **cs, int nc, int T, int reps, nm_moe_workspace *ws, double *ms, double *sgemm_ms) {
    double *t = malloc((size_t)(nc + 1) * reps * sizeof *t);
    for (int r = -2; r < reps; r++) {
        for (int i = 0; i < nc; i++) {
            double dt = moe_once(cs[i], T, ws, NULL);
            if (r >= 0) t[(size_t)i * reps + r] = dt;
        }
        if (sgemm_ms) {
            double dt = sgemm_once();
            if (r >= 0) t[(size_t)nc * reps + r] = dt;
        }
    }
    for (int i = 0; i < nc; i++) ms[i] = 1e3 * median(t + (size_t)i * reps, reps);
    if (sgemm_ms) *sgemm_ms = 1e3 * median(t + (size_t)nc * reps, reps);
    free(t);
}

// ---- 3. the PyTorch baseline (tests/bench/torch_alg1.py), in this same run ----
// The script runs as a server (--serve): the bench sends it one T at a time. The two sides
// take turns in blocks (PyTorch: two warm-up and 3 timed forwards at T = 2048, then at 256;
// then nullmap the same), several rounds, and each side's median is over all its timed runs.
// A 100 ms pause at each switch lets the other side's idle threads stop spinning (PyTorch's
// pthread OpenBLAS workers spin for a while after a call) so that neither is timed against
// the other's leftovers.

typedef struct {
    int ok;
    double ms[2], ours[2], share[2]; // [0]: T_BIG, [1]: T_SMALL
    char why[256];
} torch_result;

static torch_result run_torch(moe_case *c, int reps, nm_moe_workspace *ws) {
    torch_result res = {0};
    char cmd[1024];
    // PyTorch's settings: 2 intra-op threads (set in the script too) and OMP_WAIT_POLICY=PASSIVE —
    // with the default spinning policy its OpenMP pool and its BLAS fight over the two cores and
    // run ~3x slower (FINDINGS.md); PASSIVE is the fast, fair setting for the baseline.
    snprintf(cmd, sizeof cmd,
             "OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE exec /usr/bin/python3 tests/bench/torch_alg1.py --serve "
             "--T %d --D %d --H %d --N %d --K %d --M %d --null-bias %.9g 2>&1",
             T_BIG, D, H, N, c->K, c->M, c->bias);
    if (access("/usr/bin/python3", X_OK) != 0) {
        snprintf(res.why, sizeof res.why, "/usr/bin/python3 not found");
        return res;
    }
    int to[2], from[2];
    if (pipe(to) || pipe(from)) {
        snprintf(res.why, sizeof res.why, "pipe failed");
        return res;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(res.why, sizeof res.why, "fork failed");
        return res;
    }
    if (pid == 0) {
        dup2(to[0], 0);
        dup2(from[1], 1);
        close(to[0]); close(to[1]); close(from[0]); close(from[1]);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    signal(SIGPIPE, SIG_IGN);
    FILE *in = fdopen(to[1], "w"), *out = fdopen(from[0], "r");
    char line[1024];
    int ready = 0;
    while (fgets(line, sizeof line, out)) {
        if (!strncmp(line, "READY", 5)) {
            ready = 1;
            break;
        }
        printf("  [torch] %s", line);
        if (!strncmp(line, "SKIP", 4)) {
            snprintf(res.why, sizeof res.why, "%.200s", line);
            res.why[strcspn(res.why, "\n")] = 0;
        }
    }
    const int Ts[2] = {T_BIG, T_SMALL}, per = 3, rounds = (reps + per - 1) / per, n = rounds * per;
    double *t = malloc((size_t)4 * n * sizeof *t);
    const struct timespec pause = {0, 100000000};
    for (int r = 0; ready && r < rounds; r++) {
        nanosleep(&pause, NULL);
        for (int j = 0; ready && j < 2; j++)
            for (int i = -2; i < per; i++) {
                double ms, share;
                int T;
                fprintf(in, "%d\n", Ts[j]);
                fflush(in);
                if (!fgets(line, sizeof line, out) ||
                    sscanf(line, "TIME T=%d ms=%lf null_share=%lf", &T, &ms, &share) != 3 || T != Ts[j]) {
                    printf("  [torch] %s", line);
                    ready = 0;
                    break;
                }
                if (i >= 0) t[(size_t)(2 * j) * n + r * per + i] = ms;
                res.share[j] = share;
            }
        nanosleep(&pause, NULL);
        for (int j = 0; j < 2; j++)
            for (int i = -2; i < per; i++) {
                double ours = moe_once(c, Ts[j], ws, NULL);
                if (i >= 0) t[(size_t)(2 * j + 1) * n + r * per + i] = 1e3 * ours;
            }
    }
    if (ready) {
        for (int j = 0; j < 2; j++) {
            res.ms[j] = median(t + (size_t)(2 * j) * n, n);
            res.ours[j] = median(t + (size_t)(2 * j + 1) * n, n);
        }
        res.ok = 1;
    }
    free(t);
    fclose(in);
    while (fgets(line, sizeof line, out)) printf("  [torch] %s", line);
    fclose(out);
    int st = 0;
    waitpid(pid, &st, 0);
    if (!res.ok && !res.why[0]) snprintf(res.why, sizeof res.why, "torch_alg1.py failed (exit status %d)", st);
    return res;
}

// ---- 4. prefill vs token by token on a small model ----

static void bench_prefill(int reps) {
    // A 4-layer text model, D = 256: 4 heads of 64 (MHA), N = 16 experts of H = 128 (D/2,
    // fine-grained), K^4_0.5 (K = 4, M = 16, E[K] = 2 once trained), no shared expert, byte
    // vocabulary. Random init: the router is untrained, so most slots are real (FINDINGS.md).
    nm_config c;
    nm_config_init_byte(&c);
    c.hidden_size = 256;
    c.num_layers = 4;
    c.num_heads = 4;
    c.num_kv_heads = 4;
    c.head_dim = 64;
    c.vocab_size = 262;
    c.max_positions = 1024;
    c.moe = (nm_moe_config){.num_experts = 16, .null_copies = 16, .top_k = 4, .expert_hidden = 128,
                            .shared_expert_hidden = 0, .null_kind = NM_NULL_ZERO};
    nm_model m = {0};
    nm_error err = {0};
    nm_engine *e = NULL;
    if (nm_model_init_random(&m, &c, 7, &err) != NM_OK || nm_engine_create(&e, &m, 1024, &err) != NM_OK) {
        fprintf(stderr, "bench_moe: model setup failed: %s\n", err.msg);
        exit(1);
    }
    enum { P = 1000 };
    int32_t ids[P];
    nm_rng r;
    nm_rng_seed(&r, 11);
    ids[0] = 256;
    for (int i = 1; i < P; i++) ids[i] = 32 + (int)(nm_rng_next(&r) % 95);
    float *logits = xmalloc((size_t)c.vocab_size * sizeof(float));
    nm_trace_sample tr = {0};
    if (nm_trace_sample_init(&tr, c.num_layers, c.moe.top_k, P, &err) != NM_OK) goto fail;
    // Per round: the batch prefill without and with a trace, twice (alternating), then the
    // same 1000 tokens fed one by one.
    double *tb = malloc((size_t)2 * reps * sizeof *tb), *tt = malloc((size_t)reps * sizeof *tt),
           *ttr = malloc((size_t)2 * reps * sizeof *ttr), *tsg = malloc((size_t)reps * sizeof *tsg);
    load_mark l0 = load_now();
    for (int rep = -1; rep < reps; rep++) {
        for (int j = 0; j < 2; j++) {
            nm_engine_reset(e);
            double t0 = now_s();
            if (nm_engine_forward(e, ids, NULL, NULL, P, logits, 0, NULL, &err) != NM_OK) goto fail;
            double t1 = now_s();
            nm_engine_reset(e); // the same prefill, routing written into a trace sample
            if (nm_engine_forward(e, ids, NULL, NULL, P, logits, 0, &tr, &err) != NM_OK) goto fail;
            double t2 = now_s();
            if (rep >= 0) tb[2 * rep + j] = t1 - t0, ttr[2 * rep + j] = t2 - t1;
        }
        nm_engine_reset(e);
        double t0 = now_s();
        for (int i = 0; i < P; i++)
            if (nm_engine_forward(e, ids + i, NULL, NULL, 1, logits, 0, NULL, &err) != NM_OK) goto fail;
        if (rep >= 0) tt[rep] = now_s() - t0;
        double sg = sgemm_once(); // the machine's rate, in the same rounds
        if (rep >= 0) tsg[rep] = sg;
    }
    {
        double b = 1e3 * median(tb, 2 * reps), s = 1e3 * median(tt, reps), bt = 1e3 * median(ttr, 2 * reps);
        long real = 0;
        for (int l = 0; l < c.num_layers; l++)
            for (int t = 0; t < P; t++) real += tr.n_real[(size_t)l * tr.capacity + t];
        printf("\nprefill: 4 layers, D=256, 4 heads x 64 (MHA), N=16 experts H=128, K=4 M=16 (K^4_0.5), no shared\n"
               "expert, V=262, random init (seed 7; untrained router: %.2f real experts per token), %d tokens\n",
               (double)real / (c.num_layers * P), P);
        printf("  one batch (T=%d)      %9.2f ms   (%.0f tokens/s)\n", P, b, P / b * 1e3);
        printf("  token by token (T=1)  %9.2f ms   (%.0f tokens/s, %.3f ms per token)\n", s, P / s * 1e3, s / P);
        printf("  speed-up              %9.1fx\n", s / b);
        // The batch's floor: its useful FLOPs at the sgemm rate. No batch path can beat it, so
        // token by token over it is the most any speed-up could be on this machine.
        const double Tq = P, D_ = c.hidden_size, qd = c.num_heads * c.head_dim, kvd = c.num_kv_heads * c.head_dim;
        double fl = 0;
        for (int l = 0; l < c.num_layers; l++) {
            long real_l = 0;
            for (int t = 0; t < P; t++) real_l += tr.n_real[(size_t)l * tr.capacity + t];
            fl += 2.0 * Tq * D_ * (qd + 2 * kvd) + 2.0 * Tq * qd * D_;            // q, k, v, o projections
            fl += 4.0 * c.head_dim * c.num_heads * (Tq * (Tq + 1) / 2);           // causal QK^T and PV
            fl += 2.0 * Tq * D_ * (c.moe.num_experts + 1);                         // router
            fl += 3.0 * 2.0 * D_ * c.moe.expert_hidden * (double)real_l;           // expert GEMMs
        }
        fl += 2.0 * D_ * c.vocab_size; // LM head, last token
        const double rate = sgemm_gflops(median(tsg, reps)), floor_ms = fl / (rate * 1e9) * 1e3;
        printf("  useful FLOPs %.2f GFLOP; at the sgemm rate (%.1f GFLOP/s, same rounds) %.2f ms: the batch runs at\n"
               "  %.2fx that floor, and the most any batch path could gain here is %.1fx\n",
               fl / 1e9, rate, floor_ms, b / floor_ms, s / floor_ms);
        printf("  one batch with trace  %9.2f ms   (tracing overhead %+.2f%%)\n", bt, 100.0 * (bt / b - 1.0));
        printf("  (other processes used %.0f%% of the machine meanwhile)\n", other_load(l0, load_now()));
        add_item("tracing overhead (nm_engine_forward T=1000)", "<= 3%", bt / b - 1.0 <= 0.03, "%+.2f%%",
                 100.0 * (bt / b - 1.0), 0);
        add_item("prefill 1000 tok: batch vs token by token", ">= 20x", s / b >= 20.0, "%.1fx (ceiling here %.1fx)", s / b,
                 s / floor_ms);
    }
    nm_trace_sample_free(&tr);
    free(ttr); free(tsg);
    free(tb); free(tt); free(logits);
    nm_engine_free(e);
    nm_model_free(&m);
    return;
fail:
    fprintf(stderr, "bench_moe: engine forward failed: %s\n", err.msg);
    exit(1);
}

// ---- 5. a training step vs forward passes of the same batch ----

static void bench_train(int reps) {
    // The shipped model's shape (samples/configs/k8_rho0.5.json): D = 128, 4 layers, 4 heads of
    // 32 (2 kv heads), N = 16 experts of H = 64 + a shared expert of 64, K^8_0.5, 64x64 images in
    // 8x8 patches; a batch of 32 image samples of 64 patches + 50 prompt bytes + 5 answer bytes.
    nm_config c;
    nm_config_init_byte(&c);
    c.hidden_size = 128;
    c.num_layers = 4;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 32;
    c.max_positions = 256;
    c.moe = (nm_moe_config){.num_experts = 16, .null_copies = 16, .top_k = 8, .expert_hidden = 64,
                            .shared_expert_hidden = 64, .null_kind = NM_NULL_ZERO};
    c.has_vision = 1;
    c.image_size = 64;
    c.patch_size = 8;
    c.channels = 3;
    enum { B = 32, NP = 64, PROMPT = 50, ANSWER = 5, TS = 3 + NP + PROMPT + ANSWER };
    const int T = B * TS, pp = 3 * 8 * 8;
    nm_error err = {0};
    nm_model m = {0}, g = {0}, m1 = {0}, m2 = {0};
    nm_param_layout pl = {0};
    if (nm_model_init_random(&m, &c, 3, &err) != NM_OK || nm_model_init_zero(&g, &c, &err) != NM_OK ||
        nm_model_init_zero(&m1, &c, &err) != NM_OK || nm_model_init_zero(&m2, &c, &err) != NM_OK ||
        nm_param_layout_init(&pl, &c, &err) != NM_OK) {
        fprintf(stderr, "bench_moe: training setup failed: %s\n", err.msg);
        exit(1);
    }
    nm_train_batch_f32 b = {0};
    if (nm_train_batch_reserve_f32(&b, B, T, B * NP, 8, &err) != NM_OK) exit(1);
    b.B = B, b.T = T, b.n_patch = B * NP;
    nm_rng r;
    nm_rng_seed(&r, 5);
    for (int s = 0; s <= B; s++) b.start[s] = s * TS;
    for (int s = 0; s < B; s++)
        for (int j = 0; j < TS; j++) {
            const int t = s * TS + j;
            int id = j == 0 ? 256 : j == 1 ? 258 : j < 2 + NP ? -1 : j == 2 + NP ? 259 : 32 + (int)(nm_rng_next(&r) % 95);
            b.id[t] = id;
            b.patch[t] = id < 0 ? j - 2 : -1;
            b.modality[t] = id < 0 ? NM_MOD_VISION : id < 256 ? NM_MOD_TEXT : NM_MOD_SPECIAL;
        }
    int n_loss = 0;
    for (int t = 0; t < T; t++) {
        const int j = t % TS, next = j + 1 < TS ? b.id[t + 1] : -1;
        b.target[t] = next >= 0 && next < 256 ? next : -1;
        b.loss_kind[t] = b.target[t] < 0 ? NM_LOSS_NONE : j >= TS - ANSWER - 1 ? NM_LOSS_ANSWER : NM_LOSS_PROMPT;
        n_loss += b.target[t] >= 0;
    }
    for (int t = 0; t < T; t++) b.loss_w[t] = b.target[t] >= 0 ? 1.0f / n_loss : 0.0f;
    for (int i = 0; i < B * NP * pp; i++) b.patch_rows[i] = (float)(nm_rng_next(&r) % 2001) / 1000.0f - 1.0f;

    nm_optim_config oc;
    nm_optim_config_default(&oc);
    oc.total_steps = 1000;
    int ns = nm_model_tensor_specs(&m, NULL);
    nm_tensor_spec *specs = calloc((size_t)ns, sizeof *specs);
    nm_model_tensor_specs(&m, specs);
    nm_train_acts_f32 a = {0};
    nm_train_stats st;
    double *tf = malloc((size_t)reps * sizeof *tf), *tstep = malloc((size_t)reps * sizeof *tstep);
    load_mark l0 = load_now();
    for (int rep = -1; rep < reps; rep++) {
        double t0 = now_s();
        for (int k = 0; k < 3; k++)
            if (nm_train_forward_f32(&a, &st, m.arena, &pl, &b, 2e-2, 1e-3, &err) != NM_OK) exit(1);
        double t1 = now_s();
        // one whole step: forward, backward, gradient norm, AdamW on every tensor
        if (nm_train_forward_f32(&a, &st, m.arena, &pl, &b, 2e-2, 1e-3, &err) != NM_OK) exit(1);
        memset(g.arena, 0, g.arena_len * sizeof(float));
        if (nm_train_backward_f32(&a, g.arena, m.arena, &pl, &b, 2e-2, 1e-3, &err) != NM_OK) exit(1);
        double gn = nm_grad_norm(g.arena, g.arena_len);
        for (int i = 0; i < ns; i++) {
            size_t off = (size_t)(*specs[i].dest - m.arena);
            nm_adamw_update(m.arena + off, g.arena + off, m1.arena + off, m2.arena + off, specs[i].numel, 10, 1e-6,
                            nm_clip_scale(gn, 1.0), 1, &oc);
        }
        double t2 = now_s();
        if (rep >= 0) tf[rep] = (t1 - t0) / 3, tstep[rep] = t2 - t1;
    }
    double f = 1e3 * median(tf, reps), s = 1e3 * median(tstep, reps);
    printf("\ntraining step: the shipped model's shape (D=128, 4 layers, N=16 H=64 + shared 64, K^8_0.5), a batch\n"
           "of %d image samples = %d tokens (%d with a loss), untrained router (%.2f real experts per token)\n", B, T,
           n_loss, (double)st.real_slots / ((double)T * c.num_layers));
    printf("  training forward          %8.2f ms   (%.0f tokens/s)\n", f, T / f * 1e3);
    printf("  whole step (fwd+bwd+AdamW) %7.2f ms   (%.0f tokens/s)\n", s, T / s * 1e3);
    printf("  step / (3 forwards)       %8.2f\n", s / (3 * f));
    printf("  (other processes used %.0f%% of the machine meanwhile)\n", other_load(l0, load_now()));
    add_item("training step tokens/s (shipped model shape)", "report", 2, "%.0f tokens/s", T / s * 1e3, 0);
    add_item("training step / 3 forwards", "report (~1)", 2, "%.2f", s / (3 * f), 0);
    free(tf);
    free(tstep);
    free(specs);
    nm_train_acts_free_f32(&a);
    nm_train_batch_free_f32(&b);
    nm_param_layout_free(&pl);
    nm_model_free(&m);
    nm_model_free(&g);
    nm_model_free(&m1);
    nm_model_free(&m2);
}

// ---- main ----

int main(int argc, char **argv) {
    int reps = 9, do_torch = 1;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--no-torch")) do_torch = 0;
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--no-torch] [--reps N] [--only moe|trace|torch|prefill|train]\n", argv[0]);
            return 2;
        }
    }
    if (reps < 3) reps = 3;
#define RUN(x) (!only || !strcmp(only, x))
    const char *ev[] = {"OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OPENBLAS_NUM_THREADS"};
    printf("nullmap bench — ratios of times measured side by side in this run (median of %d after warm-up)\n", reps);
    printf("threads: omp_get_max_threads() = %d, openblas_get_num_threads() = %d;", omp_get_max_threads(),
           openblas_get_num_threads());
    for (int i = 0; i < 4; i++) printf(" %s=%s", ev[i], getenv(ev[i]) ? getenv(ev[i]) : "(unset)");
    printf("\n\n");

    SA = xmalloc((size_t)SG * SG * sizeof(float));
    SB = xmalloc((size_t)SG * SG * sizeof(float));
    SC = xmalloc((size_t)SG * SG * sizeof(float));
    fill_normal(SA, (size_t)SG * SG, 1.0f, 1);
    fill_normal(SB, (size_t)SG * SG, 1.0f, 2);

    // weights and inputs
    W.gate = xmalloc((size_t)N * H * D * sizeof(float));
    W.up = xmalloc((size_t)N * H * D * sizeof(float));
    W.down = xmalloc((size_t)N * D * H * sizeof(float));
    fill_normal(W.gate, (size_t)N * H * D, 1.0f / sqrtf(D), 101);
    fill_normal(W.up, (size_t)N * H * D, 1.0f / sqrtf(D), 102);
    fill_normal(W.down, (size_t)N * D * H, 1.0f / sqrtf(H), 103);
    float *router = xmalloc((size_t)(N + 1) * D * sizeof(float));
    fill_normal(router, (size_t)N * D, 1.0f / sqrtf(D - 1), 104);
    for (int e = 0; e < N; e++) router[(size_t)e * D + D - 1] = 0.0f; // reals ignore the bias feature
    Y = xmalloc((size_t)T_BIG * D * sizeof(float));
    fill_normal(Y, (size_t)T_BIG * D, 1.0f, 105);
    for (int t = 0; t < T_BIG; t++) Y[(size_t)t * D + D - 1] = 1.0f;
    OUT = xmalloc((size_t)T_BIG * D * sizeof(float));
    Z = xmalloc((size_t)T_BIG * (N + 1) * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T_BIG, N + 1, D, 1.0f, Y, D, router, D, 0.0f, Z, N + 1);

    moe_case k8_10 = {.name = "K^8_1.0", .K = 8, .M = 0}, k8_05 = {.name = "K^8_0.5", .K = 8, .M = N},
             k2_10 = {.name = "K^2_1.0", .K = 2, .M = 0}, k4_05 = {.name = "K^4_0.5", .K = 4, .M = N},
             k8_025 = {.name = "K^8_0.25", .K = 8, .M = 3 * N};
    moe_case *all[] = {&k8_10, &k8_05, &k2_10, &k4_05, &k8_025};
    for (int i = 0; i < 5; i++) setup_case(all[i], router);
    nm_moe_workspace ws = {0};

    printf("MoE layer D=%d H=%d N=%d F32, SwiGLU experts, no shared expert; null logit bias set per config\n", D, H, N);
    printf("useful FLOPs = router GEMM 2*T*D*(N+1) + 3 expert GEMMs x real slots x 2*D*H\n");
    printf("floor = useful FLOPs / the cblas_sgemm 2048^3 rate, measured in the same rounds as the layer\n");
    double ms_big[5] = {0}, ms_small[5] = {0}, floor_ratio[5], sg_ms = 0;
    if (RUN("moe") || RUN("torch")) {
        load_mark l0 = load_now();
        time_cases(all, 5, T_BIG, reps, &ws, ms_big, &sg_ms);
        const double rate = sgemm_gflops(sg_ms * 1e-3);
        printf("cblas_sgemm 2048^3 (2 threads, OpenBLAS): %.2f ms = %.1f GFLOP/s\n", sg_ms, rate);
        printf("  %-9s %3s %4s %5s %7s  %-18s %8s %10s %8s %9s\n", "config", "K", "M", "rho", "bias",
               "null share (want)", "E[real]", "ms T=2048", "GFLOP/s", "x floor");
        for (int i = 0; i < 5; i++) {
            moe_case *c = all[i];
            double real_slots = (1.0 - c->null_share) * T_BIG * c->K;
            double fl = 2.0 * T_BIG * D * (N + 1) + 3.0 * real_slots * 2.0 * D * H;
            floor_ratio[i] = ms_big[i] / (fl / (rate * 1e9) * 1e3);
            printf("  %-9s %3d %4d %5.2f %7.3f  %6.3f (%5.3f)   %8.2f %10.2f %8.1f %8.2fx\n", c->name, c->K, c->M,
                   c->rho, c->bias, c->null_share, 1.0 - c->rho, real_slots / T_BIG, ms_big[i], fl / ms_big[i] / 1e6,
                   floor_ratio[i]);
        }
        time_cases(all, 5, T_SMALL, reps, &ws, ms_small, NULL);
        printf("  T=%d:", T_SMALL);
        for (int i = 0; i < 5; i++) printf(" %s %.2f ms (null %.3f);", all[i]->name, ms_small[i], all[i]->null_share_small);
        printf("\n  (other processes used %.0f%% of the machine meanwhile)\n", other_load(l0, load_now()));

        double r = ms_big[1] / ms_big[0];
        add_item("K^8_0.5 / K^8_1.0 at T=2048", "<= 0.55", r <= 0.55, "%.3f (null share %.3f)", r, k8_05.null_share);
        double lo = fmin(ms_big[2], fmin(ms_big[3], ms_big[4])), hi = fmax(ms_big[2], fmax(ms_big[3], ms_big[4]));
        add_item("E[K]=2: K^2_1.0, K^4_0.5, K^8_0.25 spread", "max/min <= 1.10", hi / lo <= 1.10,
                 "max/min %.3f", hi / lo, 0);
        double worst = fmax(floor_ratio[2], fmax(floor_ratio[3], floor_ratio[4]));
        add_item("layer T=2048 E[K]=2 vs useful FLOPs/sgemm", "<= 1.25x (worst)", worst <= 1.25,
                 "%.3fx (K^8_0.25: %.3fx)", worst, floor_ratio[4]);
    }

    if (RUN("trace")) {
        // Routing written into a trace sample (as nm_engine.c does) vs the workspace arrays.
        nm_trace_sample tr = {0};
        nm_error err = {0};
        if (nm_trace_sample_init(&tr, 1, k8_025.K, T_BIG, &err) != NM_OK) {
            fprintf(stderr, "bench_moe: trace init failed\n");
            return 1;
        }
        nm_routing rt = {tr.n_real, tr.slot, tr.prob, tr.gate, tr.null_mass, tr.lse};
        int tr_reps = 3 * reps;
        load_mark l0 = load_now();
        double *on = malloc((size_t)tr_reps * sizeof *on), *off = malloc((size_t)tr_reps * sizeof *off);
        for (int r = -2; r < tr_reps; r++) {
            double a = moe_once(&k8_025, T_BIG, &ws, &rt), b = moe_once(&k8_025, T_BIG, &ws, NULL);
            if (r >= 0) on[r] = a, off[r] = b;
        }
        double mon = 1e3 * median(on, tr_reps), moff = 1e3 * median(off, tr_reps);
        // bit-for-bit: the same call twice, and with the routing going to the trace instead
        float *first = xmalloc((size_t)T_BIG * D * sizeof(float));
        moe_once(&k8_025, T_BIG, &ws, NULL);
        memcpy(first, OUT, (size_t)T_BIG * D * sizeof(float));
        moe_once(&k8_025, T_BIG, &ws, NULL);
        int same = !memcmp(first, OUT, (size_t)T_BIG * D * sizeof(float));
        moe_once(&k8_025, T_BIG, &ws, &rt);
        same = same && !memcmp(first, OUT, (size_t)T_BIG * D * sizeof(float));
        free(first);
        printf("\nrepeat and trace on/off outputs bit-for-bit identical: %s\n", same ? "yes" : "NO");
        add_item("determinism (repeat, trace on/off; bitwise)", "identical", same, "-", 0, 0);
        snprintf(items[n_items - 1].measured, sizeof items[n_items - 1].measured, "%s", same ? "identical" : "DIFFER");
        printf("tracing (K^8_0.25, T=2048, median of %d interleaved): on %.3f ms, off %.3f ms, overhead %+.2f%%\n",
               tr_reps, mon, moff, 100.0 * (mon / moff - 1.0));
        printf("  (other processes used %.0f%% of the machine meanwhile)\n", other_load(l0, load_now()));
        add_item("tracing overhead (nm_moe_forward, T=2048)", "<= 3%", mon / moff - 1.0 <= 0.03, "%+.2f%%",
                 100.0 * (mon / moff - 1.0), 0);
        free(on); free(off);
        nm_trace_sample_free(&tr);
    }

    if (RUN("torch")) {
        printf("\nPyTorch eager Algorithm 1 (%s, same shapes), tests/bench/torch_alg1.py, in turns with "
               "nullmap:\n", k8_025.name);
        load_mark l0 = load_now();
        torch_result tr = do_torch ? run_torch(&k8_025, reps, &ws) : (torch_result){.why = "--no-torch given"};
        if (tr.ok) {
            const int Ts[2] = {T_BIG, T_SMALL};
            for (int j = 0; j < 2; j++)
                printf("  T=%4d: torch %7.2f ms (null share %.3f) vs nullmap %6.2f ms -> %.2fx\n", Ts[j], tr.ms[j],
                       tr.share[j], tr.ours[j], tr.ms[j] / tr.ours[j]);
            printf("  (other processes used %.0f%% of the machine meanwhile)\n", other_load(l0, load_now()));
            // How far ahead any implementation could get on this machine: PyTorch's time over the
            // layer's floor — its useful FLOPs at the sgemm rate, or (T = 256) reading every
            // expert's weights once at the streaming rate, whichever is longer.
            const size_t wbytes = (size_t)N * H * D * sizeof(float);
            double *rd = malloc((size_t)reps * sizeof *rd);
            for (int r = -1; r < reps; r++) {
                double t = stream_read_s(W.gate, wbytes) + stream_read_s(W.up, wbytes) + stream_read_s(W.down, wbytes);
                if (r >= 0) rd[r] = t;
            }
            const double read_ms = 1e3 * median(rd, reps), rate = sgemm_gflops(sg_ms * 1e-3);
            free(rd);
            double ceil_r[2];
            printf("  the floor of any implementation (useful FLOPs at the sgemm rate %.1f GFLOP/s; all expert weights,\n"
                   "  %.1f MB, read once at %.1f GB/s = %.2f ms) and PyTorch's time over it, the most any could gain:\n",
                   rate, 3.0 * wbytes / 1e6, 3.0 * wbytes / read_ms / 1e6, read_ms);
            for (int j = 0; j < 2; j++) {
                double share = j ? k8_025.null_share_small : k8_025.null_share;
                double fl = 2.0 * Ts[j] * D * (N + 1) + 3.0 * (1.0 - share) * Ts[j] * k8_025.K * 2.0 * D * H;
                double flop_ms = fl / (rate * 1e9) * 1e3, floor_ms = fmax(flop_ms, read_ms);
                ceil_r[j] = tr.ms[j] / floor_ms;
                printf("  T=%4d: floor %6.2f ms (%s-bound) -> ceiling %.2fx; nullmap at %.2fx its floor\n", Ts[j],
                       floor_ms, flop_ms >= read_ms ? "FLOP" : "memory", ceil_r[j], tr.ours[j] / floor_ms);
            }
            double r1 = tr.ms[0] / tr.ours[0], r2 = tr.ms[1] / tr.ours[1];
            add_item("vs PyTorch Alg.1, T=2048 (K^8_0.25)", ">= 3x", r1 >= 3.0, "%.2fx (ceiling here %.2fx)", r1, ceil_r[0]);
            add_item("vs PyTorch Alg.1, T=256 (K^8_0.25)", ">= 4x", r2 >= 4.0, "%.2fx (ceiling here %.2fx)", r2, ceil_r[1]);
        } else {
            printf("  skipped: %s\n", tr.why);
            add_item("vs PyTorch Alg.1, T=2048 (K^8_0.25)", ">= 3x", -1, "skipped", 0, 0);
            add_item("vs PyTorch Alg.1, T=256 (K^8_0.25)", ">= 4x", -1, "skipped", 0, 0);
        }
    }

    if (RUN("prefill")) bench_prefill(reps < 5 ? reps : 5);
    if (RUN("train")) bench_train(reps < 5 ? reps : 5);

    printf("\n%-44s %-18s %-32s %s\n", "bar item", "bar", "measured", "status");
    for (int i = 0; i < n_items; i++)
        printf("%-44s %-18s %-32s %s\n", items[i].name, items[i].bar, items[i].measured,
               items[i].status < 0 ? "SKIPPED" : items[i].status == 2 ? "(measured)" : items[i].status ? "PASS" : "FAIL");

    for (int i = 0; i < 5; i++) free(all[i]->router);
    nm_moe_workspace_free(&ws);
    free(W.gate); free(W.up); free(W.down); free(router); free(Y); free(OUT); free(Z);
    free(SA); free(SB); free(SC);
    return 0;
}
