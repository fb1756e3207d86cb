// nm_h5_guard.h — checks an HDF5 file, before libhdf5 opens it, for corruption that libhdf5
// itself does not survive.
//
// libhdf5 1.10.8 (Debian 12) trusts the sizes inside a global heap collection (the "GCOL"
// blocks that hold variable-length strings: every string attribute and the token texts of a
// trace). One changed byte in an object's size makes H5HG_read memcpy up to 2^64 bytes (a
// segfault inside H5Aread/H5Dread); a free-space object of size 0 makes
// H5HG__cache_heap_deserialize loop forever. Neither can be caught through HDF5's API, so the
// trace reader scans the file for global heap collections and walks each one exactly as
// libhdf5 will, before H5Fopen (tests/fuzz/README.md, "Findings").
#ifndef NM_H5_GUARD_H
#define NM_H5_GUARD_H

#include "nm_error.h"

// NM_OK when every global heap collection in the HDF5 file at `path` is one that libhdf5 can
// read without crashing or hanging (and also when the file has no HDF5 superblock at all, or
// one libhdf5 refuses anyway: H5Fopen then reports the problem). Otherwise NM_ERR_FORMAT with
// "<path>: corrupt HDF5 global heap at offset N: <what is wrong>", or NM_ERR_IO (cannot open
// or read the file, with the system's reason) or NM_ERR_NOMEM.
//
// Reads the whole file once in 1 MiB blocks (memory O(1 MiB), any file size) on every call:
// readers open a trace once (nm_trace_reader keeps it open for all its samples), so a trace is
// scanned once per command.
nm_status nm_h5_check_global_heaps(const char *path, nm_error *err);

#endif
