// nm_error.h — status codes and error messages for libnullmap.
//
// Every library function that can fail returns an nm_status and, on failure, fills an
// nm_error with a one-line human-readable message that names the file and what is wrong.
// Only tools/ print messages and choose exit codes; the library never prints or exits.
#ifndef NM_ERROR_H
#define NM_ERROR_H

typedef enum {
    NM_OK = 0,
    NM_ERR_IO,          // cannot open/read/write/rename a file or directory
    NM_ERR_FORMAT,      // a file is malformed (bad header, truncated, corrupt image, bad JSON…)
    NM_ERR_INVALID,     // a value is out of range or inconsistent (shape mismatch, K > N+M, bad UTF-8…)
    NM_ERR_UNSUPPORTED, // well-formed but not supported (unknown dtype, channels != 3…)
    NM_ERR_LIMIT,       // a size exceeds a documented limit (huge image, sequence too long…)
    NM_ERR_NOMEM,       // an allocation failed
    NM_ERR_INTERNAL,    // a library bug (a broken invariant); never caused by user input
    NM_ERR_DIVERGED,    // training produced a non-finite loss or gradient
} nm_status;

typedef struct {
    nm_status code;
    char msg[1024];
} nm_error;

// Sets err (if non-NULL) and returns code. printf-style message; no trailing newline.
nm_status nm_fail(nm_error *err, nm_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

// Prepends "context: " to an existing message (e.g. the file name), keeps the code.
nm_status nm_error_prefix(nm_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void nm_error_clear(nm_error *err);
const char *nm_status_name(nm_status s);

// Convenience for allocation failures.
#define NM_NOMEM(err, what) nm_fail((err), NM_ERR_NOMEM, "out of memory allocating %s", (what))

#endif
