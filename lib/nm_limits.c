// nm_limits.c — the table of input limits, their current values and how they are changed.
#include "nm_limits.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name, *what, *env;
    uint64_t dflt, ceiling;
} limit_spec;

static const limit_spec SPECS[NM_LIMIT_COUNT] = {
#define NM_LIMIT_SPEC_(id, name, dflt, ceil, what) [NM_LIMIT_##id] = {name, what, "NULLMAP_LIMIT_" #id, dflt, ceil},
    NM_LIMIT_LIST(NM_LIMIT_SPEC_)
#undef NM_LIMIT_SPEC_
};

static uint64_t g_value[NM_LIMIT_COUNT] = {
#define NM_LIMIT_VALUE_(id, name, dflt, ceil, what) [NM_LIMIT_##id] = dflt,
    NM_LIMIT_LIST(NM_LIMIT_VALUE_)
#undef NM_LIMIT_VALUE_
};

static int valid_id(nm_limit_id id) { return (unsigned)id < NM_LIMIT_COUNT; }

uint64_t nm_limit(nm_limit_id id) { return valid_id(id) ? g_value[id] : 0; }
uint64_t nm_limit_default(nm_limit_id id) { return valid_id(id) ? SPECS[id].dflt : 0; }
uint64_t nm_limit_ceiling(nm_limit_id id) { return valid_id(id) ? SPECS[id].ceiling : 0; }
const char *nm_limit_name(nm_limit_id id) { return valid_id(id) ? SPECS[id].name : "?"; }
const char *nm_limit_what(nm_limit_id id) { return valid_id(id) ? SPECS[id].what : "?"; }
const char *nm_limit_env_name(nm_limit_id id) { return valid_id(id) ? SPECS[id].env : "?"; }

int nm_limit_find(const char *name) {
    for (int i = 0; name && i < NM_LIMIT_COUNT; i++)
        if (strcmp(name, SPECS[i].name) == 0) return i;
    return -1;
}

void nm_limits_reset(void) {
    for (int i = 0; i < NM_LIMIT_COUNT; i++) g_value[i] = SPECS[i].dflt;
}

nm_status nm_limit_set(nm_limit_id id, uint64_t value, nm_error *err) {
    if (!valid_id(id)) return nm_fail(err, NM_ERR_INVALID, "no limit number %d", (int)id);
    if (value < 1 || value > SPECS[id].ceiling)
        return nm_fail(err, NM_ERR_INVALID, "limit %s = %llu must be in 1..%llu", SPECS[id].name,
                       (unsigned long long)value, (unsigned long long)SPECS[id].ceiling);
    g_value[id] = value;
    return NM_OK;
}

// "123", "64M", "2G" into *out; 0 on success.
static int parse_size(const char *s, uint64_t *out) {
    if (!s || !isdigit((unsigned char)s[0])) return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno == ERANGE) return -1;
    int shift = 0;
    switch (*end) {
    case '\0': break;
    case 'K': case 'k': shift = 10; end++; break;
    case 'M': case 'm': shift = 20; end++; break;
    case 'G': case 'g': shift = 30; end++; break;
    case 'T': case 't': shift = 40; end++; break;
    default: return -1;
    }
    if (*end != '\0' || (shift && v > (UINT64_MAX >> shift))) return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

static void list_names(char *buf, size_t cap) {
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < NM_LIMIT_COUNT && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%s", i ? ", " : "", SPECS[i].name);
}

nm_status nm_limit_set_from_string(const char *assignment, nm_error *err) {
    const char *eq = assignment ? strchr(assignment, '=') : NULL;
    if (!eq) return nm_fail(err, NM_ERR_INVALID, "limit '%s' must be NAME=VALUE", assignment ? assignment : "(null)");
    char name[64];
    size_t nl = (size_t)(eq - assignment);
    int id = -1;
    if (nl < sizeof name) {
        memcpy(name, assignment, nl);
        name[nl] = '\0';
        id = nm_limit_find(name);
    }
    if (id < 0) {
        char names[512];
        list_names(names, sizeof names);
        return nm_fail(err, NM_ERR_INVALID, "unknown limit '%.*s' (limits: %s)", (int)(nl < 64 ? nl : 64), assignment,
                       names);
    }
    uint64_t v;
    if (parse_size(eq + 1, &v) != 0)
        return nm_fail(err, NM_ERR_INVALID, "limit %s: '%s' is not a size (an integer, optionally with K, M, G or T)",
                       SPECS[id].name, eq + 1);
    return nm_limit_set((nm_limit_id)id, v, err);
}

nm_status nm_limits_from_env(nm_error *err) {
    for (int i = 0; i < NM_LIMIT_COUNT; i++) {
        const char *v = getenv(SPECS[i].env);
        if (!v) continue;
        uint64_t x;
        if (parse_size(v, &x) != 0)
            return nm_fail(err, NM_ERR_INVALID, "%s='%s' is not a size (an integer, optionally with K, M, G or T)",
                           SPECS[i].env, v);
        nm_status s = nm_limit_set((nm_limit_id)i, x, err);
        if (s != NM_OK) return nm_error_prefix(err, "%s", SPECS[i].env);
    }
    return NM_OK;
}

nm_status nm_limit_fail(nm_error *err, nm_limit_id id, const char *fmt, ...) {
    if (!err) return NM_ERR_LIMIT;
    char found[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(found, sizeof found, fmt, ap);
    va_end(ap);
    const char *name = nm_limit_name(id);
    return nm_fail(err, NM_ERR_LIMIT, "%s over the limit of %llu %s (%s; raise it with --set-limit %s=N or %s)", found,
                   (unsigned long long)nm_limit(id), nm_limit_what(id), name, name, nm_limit_env_name(id));
}
