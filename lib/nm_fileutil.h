// nm_fileutil.h — small file helpers: atomic writes (temp + fsync + rename), directories.
#ifndef NM_FILEUTIL_H
#define NM_FILEUTIL_H

#include <stddef.h>

#include "nm_error.h"

// A file written to `path`.tmp-<pid> and renamed over `path` on commit, so a reader (or a
// crash) never sees a half-written file.
typedef struct {
    char *path, *tmp_path;
    int fd;
} nm_atomic_file;

// The name a write in progress uses beside `path`: `path`.tmp-<pid> (malloc'd; NULL on OOM).
// Every writer of the library uses it, so a leftover is always recognisable.
char *nm_tmp_path(const char *path);
// fsync a file or a directory. A file system that cannot sync a directory is not an error.
nm_status nm_fsync_path(const char *path, int is_dir, nm_error *err);
// fsync the directory holding `path`, best effort (after a rename into it).
void nm_fsync_parent(const char *path);

nm_status nm_atomic_open(nm_atomic_file *f, const char *path, nm_error *err);
nm_status nm_atomic_write(nm_atomic_file *f, const void *data, size_t n, nm_error *err);
nm_status nm_atomic_commit(nm_atomic_file *f, nm_error *err); // fsync, rename, fsync dir
void nm_atomic_abort(nm_atomic_file *f);                       // removes the temp file; safe on a zeroed f
// Writes a whole file atomically.
nm_status nm_write_file_atomic(const char *path, const void *data, size_t n, nm_error *err);

// Creates a directory and its parents (mode 0777 & ~umask). Existing directories are fine.
nm_status nm_mkdir_p(const char *path, nm_error *err);
// The shallowest ancestor of `path` (or path itself) that does not exist yet, malloc'd; NULL
// when path exists. nm_mkdir_p(path) creates exactly this directory and those below it.
char *nm_first_missing_dir(const char *path);
// Undo of nm_mkdir_p: removes `path` and its parents up to and including `top` (empty
// directories only). Used to leave nothing behind after a failure.
void nm_rmdir_up_to(const char *path, const char *top);
// Removes a file or a directory tree (links are removed, never followed).
nm_status nm_remove_tree(const char *path, nm_error *err);
// 1 if path exists (any type), 0 otherwise.
int nm_path_exists(const char *path);
int nm_is_dir(const char *path);
// Returns malloc'd "dir/name" or NULL.
char *nm_path_join(const char *dir, const char *name);
// Reads a whole file (regular, or a pipe read to its end) of at most max_size bytes; adds a NUL
// terminator (not counted). Directories and oversized files are refused naming the path.
nm_status nm_read_file(const char *path, size_t max_size, char **out, size_t *size, nm_error *err);

#endif
