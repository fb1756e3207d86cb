// nm_error.c — error message helpers.
#include "nm_error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

nm_status nm_fail(nm_error *err, nm_status code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

nm_status nm_error_prefix(nm_error *err, const char *fmt, ...) {
    if (!err) return NM_ERR_INTERNAL;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    // Shift the old message right and put "prefix: " in front, truncating at the end.
    size_t cap = sizeof err->msg, pl = strlen(prefix) + 2, ol = strlen(err->msg);
    if (pl >= cap) pl = cap - 1;
    if (pl + ol >= cap) ol = cap - 1 - pl;
    memmove(err->msg + pl, err->msg, ol);
    err->msg[pl + ol] = '\0';
    memcpy(err->msg, prefix, pl - 2 < strlen(prefix) ? pl - 2 : strlen(prefix));
    if (pl >= 2) {
        err->msg[pl - 2] = ':';
        err->msg[pl - 1] = ' ';
    }
    return err->code;
}

void nm_error_clear(nm_error *err) {
    if (err) {
        err->code = NM_OK;
        err->msg[0] = '\0';
    }
}

const char *nm_status_name(nm_status s) {
    switch (s) {
    case NM_OK: return "ok";
    case NM_ERR_IO: return "i/o error";
    case NM_ERR_FORMAT: return "format error";
    case NM_ERR_INVALID: return "invalid input";
    case NM_ERR_UNSUPPORTED: return "unsupported";
    case NM_ERR_LIMIT: return "limit exceeded";
    case NM_ERR_NOMEM: return "out of memory";
    case NM_ERR_INTERNAL: return "internal error";
    case NM_ERR_DIVERGED: return "training diverged";
    }
    return "unknown error";
}
