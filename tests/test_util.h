// test_util.h — shared helpers for the Check test suites.
//
// A test file defines its suite with NM_TEST_SUITE(name) { ... return s; }; the suite
// registers itself at start-up, so adding a file to tests/ is all it takes.
// Run one suite: CK_RUN_SUITE=router build/run_tests
#ifndef NM_TEST_UTIL_H
#define NM_TEST_UTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

void nm_test_register(const char *name, Suite *(*make)(void));

#define NM_TEST_SUITE(name)                                                        \
    static Suite *name##_make_suite(void);                                         \
    __attribute__((constructor)) static void name##_register_suite(void) {         \
        nm_test_register(#name, name##_make_suite);                                \
    }                                                                              \
    static Suite *name##_make_suite(void)

// Directory of tests/ in the source tree (fixtures live in tests/fixtures).
const char *nm_test_dir(void);
// Fresh empty directory under $TMPDIR (or /tmp); caller frees the string.
char *nm_test_tmpdir(void);
// Removes a directory tree (best effort) and frees nothing.
void nm_test_rmtree(const char *path);
// Joins a directory and a name into a static rotating buffer (valid for 8 calls).
const char *nm_test_path(const char *dir, const char *name);
// Reads a whole file, which must exist (the test fails otherwise); NUL-terminated, caller
// frees. size may be NULL.
char *nm_test_read_file(const char *path, size_t *size);
// Writes bytes to a file; returns 0 on success.
int nm_test_write_file(const char *path, const void *data, size_t size);

// Records that n test cases of `what` were not run, with the reason: printed at once as
// "SKIPPED: what: reason (n cases)" and again at the end of the run (check_main), never counted
// as passed (Check itself has no skipped state).
void nm_test_skip(const char *what, int n, const char *reason);
// Prints the skip lines recorded so far; returns how many cases were skipped.
int nm_test_print_skips(void);

// Deterministic random numbers for tests (seeded per test; fresh, non-zero inputs).
typedef struct { uint64_t s; } nm_test_rng;
uint64_t nm_test_rng_next(nm_test_rng *r);
double nm_test_rng_uniform(nm_test_rng *r);            // [0, 1)
double nm_test_rng_normal(nm_test_rng *r);             // N(0, 1)
void nm_test_fill_normal(nm_test_rng *r, float *x, size_t n, float std);

#endif
