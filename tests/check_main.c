// check_main.c — runs every registered Check suite; exits non-zero on any failure.
#include <stdio.h>
#include <stdlib.h>

#include "nm_simd.h"
#include "nm_viz.h"
#include "test_util.h"

#define MAX_SUITES 64
static struct { const char *name; Suite *(*make)(void); } suites[MAX_SUITES];
static int n_suites = 0;

void nm_test_register(const char *name, Suite *(*make)(void)) {
    if (n_suites >= MAX_SUITES) {
        fprintf(stderr, "check_main: too many suites (raise MAX_SUITES)\n");
        exit(2);
    }
    suites[n_suites].name = name;
    suites[n_suites].make = make;
    n_suites++;
}

int main(void) {
    if (n_suites == 0) {
        fprintf(stderr, "check_main: no suites registered\n");
        return 2;
    }
    atexit(nm_viz_release_static); // cairo and fontconfig caches: valgrind then sees no leak
    static const char *isa_names[] = {"portable C", "AVX2", "AVX-512"};
    printf("vector path: %s (NM_ISA=generic|avx2 selects a lower one)\n", isa_names[nm_isa()]);
    SRunner *sr = srunner_create(suites[0].make());
    for (int i = 1; i < n_suites; i++) srunner_add_suite(sr, suites[i].make());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    nm_test_print_skips(); // after Check's own summary, so it is not missed
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
