// cli.c — exit codes, error printing, option parsing and the progress bar.
#include "cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <unistd.h>

int cli_exit_code(nm_status s) {
    switch (s) {
    case NM_OK: return EXIT_OK;
    case NM_ERR_IO: return EXIT_IO;
    case NM_ERR_FORMAT:
    case NM_ERR_INVALID:
    case NM_ERR_UNSUPPORTED:
    case NM_ERR_LIMIT: return EXIT_BAD_INPUT;
    case NM_ERR_NOMEM:
    case NM_ERR_INTERNAL: return EXIT_INTERNAL;
    case NM_ERR_DIVERGED: return EXIT_DIVERGED;
    }
    return EXIT_INTERNAL;
}

int cli_report(const char *cmd, const nm_error *err) {
    fprintf(stderr, "nullmap %s: error: %s\n", cmd, err->msg[0] ? err->msg : nm_status_name(err->code));
    return cli_exit_code(err->code);
}

int cli_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "nullmap %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(see 'nullmap %s --help')\n", cmd);
    va_end(ap);
    return EXIT_USAGE;
}

int cli_parse_int(const char *s, long lo, long hi, int *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void cli_progress_start(cli_progress *p, int total, const char *what) {
    p->total = total;
    p->done = 0;
    p->tty = isatty(STDERR_FILENO);
    p->last_decile = -1;
    p->t0 = cli_now();
    p->what = what;
    cli_progress_step(p, 0);
}

void cli_progress_step(cli_progress *p, int done) {
    p->done = done;
    double el = cli_now() - p->t0, rate = el > 0 ? done / el : 0;
    double eta = rate > 0 ? (p->total - done) / rate : 0;
    int width = 30, fill = p->total ? (int)((long)width * done / p->total) : width;
    int decile = p->total ? (int)(10L * done / p->total) : 10;
    if (!p->tty && decile == p->last_decile) return;
    p->last_decile = decile;
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
    bar[width] = '\0';
    fprintf(stderr, "%s[%s] %d/%d %s  %.2f/s  elapsed %.0fs  eta %.0fs%s", p->tty ? "\r" : "", bar, done, p->total,
            p->what, rate, el, eta, p->tty ? "  " : "\n");
    fflush(stderr);
}

void cli_progress_end(cli_progress *p) {
    if (p->tty) fprintf(stderr, "\n");
}

void cli_print_text(FILE *out, const char *s) {
    // Control characters escaped so that a model's answer cannot move the cursor or break
    // the table; everything else (valid UTF-8 by construction) printed as is.
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '\n') fputs("\\n", out);
        else if (*p == '\t') fputs("\\t", out);
        else if (*p == '\\') fputs("\\\\", out);
        else if (*p < 0x20 || *p == 0x7f) fprintf(out, "\\x%02x", *p);
        else fputc(*p, out);
    }
}

int cli_parse_storage_dtype(const char *s, nm_dtype *out) {
    static const struct { const char *name; nm_dtype dt; } names[] = {
        {"f32", NM_DT_F32}, {"bf16", NM_DT_BF16}, {"f16", NM_DT_F16}};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (!strcmp(s, names[i].name)) {
            *out = names[i].dt;
            return 0;
        }
    return 1;
}
