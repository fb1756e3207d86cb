// test_util.c — helpers shared by the test suites.
#define _XOPEN_SOURCE 700
#include "test_util.h"

#include "nm_fileutil.h"

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef NM_TEST_DIR
#define NM_TEST_DIR "tests"
#endif

const char *nm_test_dir(void) { return NM_TEST_DIR; }

char *nm_test_tmpdir(void) {
    const char *base = getenv("TMPDIR");
    if (!base || !*base) base = "/tmp";
    size_t n = strlen(base) + 32;
    char *p = malloc(n);
    ck_assert_ptr_nonnull(p);
    snprintf(p, n, "%s/nmtest-XXXXXX", base);
    ck_assert_msg(mkdtemp(p) != NULL, "mkdtemp failed: %s", strerror(errno));
    return p;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

void nm_test_rmtree(const char *path) {
    if (path) nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

const char *nm_test_path(const char *dir, const char *name) {
    static char buf[8][4096];
    static int next = 0;
    char *b = buf[next];
    next = (next + 1) % 8;
    snprintf(b, sizeof buf[0], "%s/%s", dir, name);
    return b;
}

char *nm_test_read_file(const char *path, size_t *size) {
    char *buf = NULL;
    size_t n = 0;
    nm_error err = {0};
    ck_assert_msg(nm_read_file(path, (size_t)1 << 30, &buf, &n, &err) == NM_OK, "%s", err.msg);
    if (size) *size = n;
    return buf;
}

int nm_test_write_file(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = size ? fwrite(data, 1, size, f) : 0;
    int rc = fclose(f);
    return (w == size && rc == 0) ? 0 : -1;
}

uint64_t nm_test_rng_next(nm_test_rng *r) { // splitmix64
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

double nm_test_rng_uniform(nm_test_rng *r) { return (double)(nm_test_rng_next(r) >> 11) * 0x1.0p-53; }

double nm_test_rng_normal(nm_test_rng *r) {
    double u1 = nm_test_rng_uniform(r), u2 = nm_test_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void nm_test_fill_normal(nm_test_rng *r, float *x, size_t n, float std) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * nm_test_rng_normal(r));
}

static struct {
    char line[600];
    int n;
} skips[16];
static int n_skips = 0;

void nm_test_skip(const char *what, int n, const char *reason) {
    if (n_skips == (int)(sizeof skips / sizeof skips[0])) return;
    snprintf(skips[n_skips].line, sizeof skips[0].line, "SKIPPED: %s: %s (%d cases, not run, not counted as passed)",
             what, reason, n);
    skips[n_skips].n = n;
    printf("%s\n", skips[n_skips].line);
    fflush(stdout);
    n_skips++;
}

int nm_test_print_skips(void) {
    int total = 0;
    for (int i = 0; i < n_skips; i++) {
        printf("%s\n", skips[i].line);
        total += skips[i].n;
    }
    return total;
}
