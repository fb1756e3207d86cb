// fuzz_util.h — shared helpers of the libFuzzer harnesses (tests/fuzz/README.md).
#ifndef NM_FUZZ_UTIL_H
#define NM_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>

// Writes the input to a file in fuzz_tmp_dir() (the same one each time) and returns its path,
// for readers that take a path.
const char *fuzz_file_put(const uint8_t *data, size_t size);
// A private temporary directory (created once per process, removed at exit; under $TMPDIR,
// else /dev/shm when writable, else /tmp).
const char *fuzz_tmp_dir(void);
// Writes data to dir/name (replacing it); aborts on failure (a harness bug, not a finding).
void fuzz_write(const char *dir, const char *name, const void *data, size_t size);
// Removes dir/name if it exists.
void fuzz_remove(const char *dir, const char *name);
// The first occurrence of sep in data[0..size) or NULL.
const uint8_t *fuzz_find(const uint8_t *data, size_t size, const char *sep);
// Sets a limit by name, aborting on failure (limits keep each input inside libFuzzer's time
// and memory budget: a 64-Mpx image or a 2^28-entry trace is a valid input, not a bug).
void fuzz_limit(const char *assignment);

#endif
