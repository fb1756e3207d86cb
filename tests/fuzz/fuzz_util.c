// fuzz_util.c — shared helpers of the libFuzzer harnesses.
#define _GNU_SOURCE
#include "fuzz_util.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nm_error.h"
#include "nm_fileutil.h"
#include "nm_limits.h"

static char g_dir[256];
static char g_input[320];

// A real file, not a memfd: HDF5 resolves the path it opens, and /proc/self/fd/N of a memfd
// names no file ("can't retrieve real path").
const char *fuzz_file_put(const uint8_t *data, size_t size) {
    if (!g_input[0]) snprintf(g_input, sizeof g_input, "%s/input", fuzz_tmp_dir());
    FILE *f = fopen(g_input, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    if (fclose(f) != 0) abort();
    return g_input;
}

static void remove_tmp_dir(void) {
    if (g_dir[0]) nm_remove_tree(g_dir, NULL);
}

const char *fuzz_tmp_dir(void) {
    if (!g_dir[0]) {
        const char *base = getenv("TMPDIR");
        if (!base || !*base) base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"; // memory-backed when possible
        snprintf(g_dir, sizeof g_dir, "%s/nm-fuzz-XXXXXX", base);
        if (!mkdtemp(g_dir)) abort();
        atexit(remove_tmp_dir);
    }
    return g_dir;
}

void fuzz_write(const char *dir, const char *name, const void *data, size_t size) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    if (fclose(f) != 0) abort();
}

void fuzz_remove(const char *dir, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
}

const uint8_t *fuzz_find(const uint8_t *data, size_t size, const char *sep) {
    size_t n = strlen(sep);
    if (n == 0 || size < n) return NULL;
    return memmem(data, size, sep, n);
}

void fuzz_limit(const char *assignment) {
    nm_error err;
    if (nm_limit_set_from_string(assignment, &err) != NM_OK) {
        fprintf(stderr, "fuzz_limit: %s\n", err.msg);
        abort();
    }
}
