// cli.h — shared helpers of the nullmap command-line tool: exit codes, errors, progress.
#ifndef NM_CLI_H
#define NM_CLI_H

#include <stdio.h>

#include "nm_engine.h"
#include "nm_error.h"
#include "nm_metrics.h"
#include "nm_render.h"
#include "nm_safetensors.h"

// Exit codes (documented in README.md and in `nullmap --help`).
enum {
    EXIT_OK = 0,
    EXIT_BAD_INPUT = 1, // a file or value is malformed, unsupported or over a limit
    EXIT_USAGE = 2,     // the command line is wrong
    EXIT_IO = 3,        // a file is missing, unreadable or unwritable
    EXIT_INTERNAL = 4,  // out of memory or a bug
    EXIT_DIVERGED = 5,  // training stopped on a non-finite loss or gradient
};

int cli_exit_code(nm_status s);
// Prints "nullmap CMD: error: MSG" to stderr and returns the exit code for err.
int cli_report(const char *cmd, const nm_error *err);
// Prints a usage error and returns EXIT_USAGE.
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Parses a model storage dtype option value: f32, bf16 or f16; returns 0 on success.
int cli_parse_storage_dtype(const char *s, nm_dtype *out);
// Parses a non-negative integer option value; returns 0 on success.
int cli_parse_int(const char *s, long lo, long hi, int *out);

// A progress bar on stderr (redrawn in place on a terminal, one line per 10% otherwise).
typedef struct {
    int total, done, tty, last_decile;
    double t0;
    const char *what;
} cli_progress;
void cli_progress_start(cli_progress *p, int total, const char *what);
void cli_progress_step(cli_progress *p, int done);
void cli_progress_end(cli_progress *p);
double cli_now(void);

// Prints text with control characters escaped (\\n, \\t, \\xNN).
void cli_print_text(FILE *out, const char *s);
// Prints the per-layer, per-modality compute table.
void cli_print_summary(const nm_metrics *m, FILE *out);

// Picture options shared by run, render and report: help text, and a parser for one option
// (name without the dashes). Returns EXIT_OK, EXIT_USAGE (message printed) or -1 (not a
// picture option).
extern const char *CLI_RENDER_HELP;
int cli_render_option(const char *cmd, const char *name, const char *value, nm_render_opts *o);

// Device options shared by run and batch (--device, --precision): help text, a parser for one
// option (name without the dashes; returns EXIT_OK, EXIT_USAGE with the message printed, or -1
// for another option), and the resolution into engine options: the default device when none was
// given, and a clear error (non-zero exit code returned) when the one asked for is unavailable.
typedef struct {
    const char *device; // NULL: the default
    int bf16;
} cli_device;
extern const char *CLI_DEVICE_HELP;
int cli_device_option(const char *cmd, const char *name, const char *value, cli_device *d);
int cli_device_resolve(const char *cmd, const cli_device *d, nm_engine_options *out);

int cmd_render(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_batch(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_report(int argc, char **argv);
int cmd_data(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);

#endif
