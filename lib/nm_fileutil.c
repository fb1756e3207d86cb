// nm_fileutil.c — atomic writes and directory helpers.
#define _GNU_SOURCE // nftw
#include "nm_fileutil.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

char *nm_path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int nm_path_exists(const char *path) {
    struct stat sb;
    return lstat(path, &sb) == 0;
}

char *nm_first_missing_dir(const char *path) {
    if (nm_path_exists(path)) return NULL;
    char *p = strdup(path);
    if (!p) return NULL;
    for (;;) {
        char *slash = strrchr(p, '/');
        while (slash && slash > p && slash[1] == '\0') { // trailing slashes
            *slash = '\0';
            slash = strrchr(p, '/');
        }
        if (!slash || slash == p) return p;
        *slash = '\0';
        if (nm_path_exists(p)) {
            *slash = '/';
            return p;
        }
    }
}

void nm_rmdir_up_to(const char *path, const char *top) {
    if (!top) return;
    char *p = strdup(path);
    if (!p) return;
    size_t tl = strlen(top);
    for (;;) {
        if (rmdir(p) != 0 || strlen(p) <= tl) break;
        char *slash = strrchr(p, '/');
        if (!slash) break;
        *slash = '\0';
    }
    free(p);
}

int nm_is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

nm_status nm_atomic_open(nm_atomic_file *f, const char *path, nm_error *err) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
    f->path = strdup(path);
    f->tmp_path = nm_tmp_path(path);
    if (!f->path || !f->tmp_path) {
        nm_atomic_abort(f);
        return NM_NOMEM(err, "path");
    }
    f->fd = open(f->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        nm_status s = nm_fail(err, NM_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
        free(f->tmp_path);
        f->tmp_path = NULL; // nothing to remove
        nm_atomic_abort(f);
        return s;
    }
    return NM_OK;
}

nm_status nm_atomic_write(nm_atomic_file *f, const void *data, size_t n, nm_error *err) {
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(f->fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return nm_fail(err, NM_ERR_IO, "%s: write failed: %s", f->path, strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
    return NM_OK;
}

char *nm_tmp_path(const char *path) {
    size_t n = strlen(path) + 32;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s.tmp-%ld", path, (long)getpid());
    return p;
}

nm_status nm_fsync_path(const char *path, int is_dir, nm_error *err) {
    int fd = open(path, (is_dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) return nm_fail(err, NM_ERR_IO, "%s: cannot open to sync: %s", path, strerror(errno));
    int rc = fsync(fd), e = errno;
    close(fd);
    // Some file systems cannot sync a directory (EINVAL); the rename itself has happened.
    if (rc != 0 && !(is_dir && (e == EINVAL || e == ENOTSUP)))
        return nm_fail(err, NM_ERR_IO, "%s: fsync failed: %s", path, strerror(e));
    return NM_OK;
}

void nm_fsync_parent(const char *path) {
    char *copy = strdup(path);
    if (!copy) return;
    nm_fsync_path(dirname(copy), 1, NULL); // best effort: the data itself is already synced
    free(copy);
}

nm_status nm_atomic_commit(nm_atomic_file *f, nm_error *err) {
    nm_status s = NM_OK;
    if (fsync(f->fd) != 0) s = nm_fail(err, NM_ERR_IO, "%s: fsync failed: %s", f->path, strerror(errno));
    if (close(f->fd) != 0 && s == NM_OK) s = nm_fail(err, NM_ERR_IO, "%s: close failed: %s", f->path, strerror(errno));
    f->fd = -1;
    if (s == NM_OK && rename(f->tmp_path, f->path) != 0)
        s = nm_fail(err, NM_ERR_IO, "%s: cannot rename temporary file into place: %s", f->path, strerror(errno));
    if (s == NM_OK) {
        nm_fsync_parent(f->path);
        free(f->tmp_path);
        f->tmp_path = NULL;
    }
    nm_atomic_abort(f);
    return s;
}

void nm_atomic_abort(nm_atomic_file *f) {
    if (!f) return;
    if (f->fd >= 0) close(f->fd);
    if (f->tmp_path) unlink(f->tmp_path);
    free(f->tmp_path);
    free(f->path);
    memset(f, 0, sizeof *f);
    f->fd = -1;
}

nm_status nm_write_file_atomic(const char *path, const void *data, size_t n, nm_error *err) {
    nm_atomic_file f;
    nm_status s = nm_atomic_open(&f, path, err);
    if (s != NM_OK) return s;
    if ((s = nm_atomic_write(&f, data, n, err)) != NM_OK) {
        nm_atomic_abort(&f);
        return s;
    }
    return nm_atomic_commit(&f, err);
}

nm_status nm_mkdir_p(const char *path, nm_error *err) {
    char *p = strdup(path);
    if (!p) return NM_NOMEM(err, "path");
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/') p[--n] = '\0';
    for (char *q = p + 1;; q++) {
        char c = *q;
        if (c == '/' || c == '\0') {
            *q = '\0';
            if (mkdir(p, 0777) != 0 && errno != EEXIST) {
                nm_status s = nm_fail(err, NM_ERR_IO, "%s: cannot create directory: %s", p, strerror(errno));
                free(p);
                return s;
            }
            if (!nm_is_dir(p)) {
                nm_status s = nm_fail(err, NM_ERR_IO, "%s: exists and is not a directory", p);
                free(p);
                return s;
            }
            *q = c;
            if (c == '\0') break;
        }
    }
    free(p);
    return NM_OK;
}

nm_status nm_read_file(const char *path, size_t max_size, char **out, size_t *size, nm_error *err) {
    *out = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return nm_fail(err, NM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    nm_status s = NM_OK;
    char *buf = NULL;
    size_t cap = 64 * 1024, n = 0;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        s = nm_fail(err, NM_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto out;
    }
    if (S_ISDIR(sb.st_mode)) {
        s = nm_fail(err, NM_ERR_IO, "%s: cannot read: is a directory", path);
        goto out;
    }
    if (S_ISREG(sb.st_mode)) {
        if ((unsigned long long)sb.st_size > max_size) {
            s = nm_fail(err, NM_ERR_LIMIT, "%s: file is %lld bytes, over the limit of %zu", path, (long long)sb.st_size,
                        max_size);
            goto out;
        }
        cap = (size_t)sb.st_size + 1; // the first read already meets the end of the file
    }
    // A pipe or a file that grows while we read is read to its end, up to the limit.
    for (;;) {
        if (!buf || n == cap) {
            size_t ncap = !buf ? cap : cap <= max_size / 2 ? cap * 2 : max_size + 1;
            if (buf && cap > max_size) {
                s = nm_fail(err, NM_ERR_LIMIT, "%s: file is over the limit of %zu bytes", path, max_size);
                goto out;
            }
            char *p = realloc(buf, ncap + 1);
            if (!p) {
                s = NM_NOMEM(err, "file buffer");
                goto out;
            }
            buf = p;
            cap = ncap;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            s = nm_fail(err, NM_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
            goto out;
        }
        if (r == 0) break;
        n += (size_t)r;
    }
    buf[n] = '\0';
out:
    close(fd);
    if (s != NM_OK) {
        free(buf);
        return s;
    }
    *out = buf;
    *size = n;
    return NM_OK;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

nm_status nm_remove_tree(const char *path, nm_error *err) {
    // depth first, without following symbolic links (a link is removed, not its target)
    if (nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
        return nm_fail(err, NM_ERR_IO, "cannot remove %s: %s", path, strerror(errno));
    return NM_OK;
}
