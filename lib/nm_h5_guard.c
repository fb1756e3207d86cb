// nm_h5_guard.c — the global heap check that runs before libhdf5 opens a trace (nm_h5_guard.h).
//
// ---- Layout (HDF5 File Format Specification, section III.E "Global Heap"; HDF5 1.10.8
// src/H5HGpkg.h for the sizes, src/H5HGcache.c for how the library parses it) ----
//
// Ls is the superblock's "size of lengths" (byte 13 of a version 0/1 superblock, byte 10 of a
// version 2/3 one; 8 in every file nullmap writes), P = align8(8 + Ls) (16 for Ls = 8).
//
//   Global heap collection, at any byte offset (libhdf5 puts it wherever file space is free:
//   not necessarily a multiple of 8, e.g. 18411 in tests/fuzz/crashes/trace/
//   hdf5-H5HG-zero-free-space-hang.h5):
//     +0   "GCOL"                     signature
//     +4   version           1 byte   1 (libhdf5 refuses any other value)
//     +5   reserved          3 bytes  0 (H5HG__create writes zeros; libhdf5 does not read them)
//     +8   collection size   Ls bytes the whole collection, this header included; >= 4096
//                                     (H5HG_MINSIZE); a multiple of 8 when libhdf5 wrote it
//     +P   objects, one after the other, to the end of the collection
//   Object:
//     +0   heap object index 2 bytes  1..65535; 0 marks the free-space object
//     +2   reference count   2 bytes
//     +4   reserved          4 bytes
//     +8   object size       Ls bytes index > 0: the data bytes; index 0: the whole free block,
//                                     this header included
//     +P   data (index > 0 only), zero-padded to a multiple of 8
//   All integers little-endian. A length field wider than 8 bytes keeps its low 8 bytes, as
//   libhdf5's H5F_DECODE_LENGTH does.
//
// ---- How libhdf5 1.10.8 reads it (H5HG__cache_heap_deserialize, then H5HG_read) ----
//
//   pos = P
//   while pos < collection size:
//       if pos + P > collection size: the rest is free space without a header; stop
//       index, size = the object header at pos
//       pos += index > 0 ? P + align8(size) : size     <- free space does NOT end the walk
//   H5HG_read(index) then memcpy's `size` bytes from the object's data, trusting it.
//
// So a free-space object of size 0 never advances pos (the hang), and an object size larger
// than the collection is copied from past the end of a 4 KiB buffer (the 2^51-byte memcpy).
// The writer (H5HG__create, H5HG_alloc, H5HG_extend, H5HG_remove in src/H5HG.c) always keeps
// the free-space object last, sized exactly to the end of the collection, and writes no free-
// space header when fewer than P bytes remain.
//
// ---- The rules checked here, for every candidate collection ----
//
//   candidate   "GCOL", 1, 0, 0, 0 at any offset (bytes past the end of the file count as
//               zeros, as libhdf5's sec2 driver reads them); anything else is not a collection
//               libhdf5 can load and is skipped
//   header      the 8 + Ls header bytes lie inside the file
//   size        collection size >= 4096 and offset + collection size <= file size (libhdf5
//               reads the bytes past the end of the file as zeros: a truncated collection can
//               turn into a zero-size free-space object)
//   object      index > 0: P + align8(size) <= bytes left in the collection
//   free space  index 0: P <= size <= bytes left in the collection. libhdf5 writes exactly the
//               bytes left; a smaller (but non-zero-progress) size is what the library's own
//               reader tolerates by walking on, so the walk here goes on as well and checks
//               what follows
//   tail        fewer than P bytes left: free space without a header, the walk ends
//   work        at most file size / 8 + 1024 object headers in all (see walk_budget)
// A file libhdf5 wrote passes every rule; a file that passes cannot make 1.10.8 copy past a
// collection or loop in it.
//
// ---- False positives: why a "GCOL" that is not a collection is harmless ----
//
// The scan cannot tell a collection from the same bytes inside other data without parsing all
// of HDF5's metadata, so it treats every "GCOL" 01 00 00 00 as a collection and checks it.
// In compressed (deflate) chunks those 8 bytes occur at a given offset with probability 2^-64:
// about once in 2^24 TB. Without the reserved zeros it would be 2^-40 (once in ~1 TB), too
// often to refuse a valid file for it, so a version-1 "GCOL" with non-zero reserved bytes is
// skipped even though libhdf5 would load it (a corrupt collection whose reserved bytes are also
// damaged escapes the check: the price of not refusing valid files). nullmap's uncompressed
// data are small integers and floats, and its strings cannot hold the NUL bytes of the pattern
// except at the very end of a heap object, where the zero padding follows: a stored text that
// ends in "GCOL\x01" with a length of 5 mod 8 looks like a collection header. Such a false
// candidate is then read as a collection whose size is the next object's header, and is most
// likely refused — a documented, accepted limitation (control characters in prompts).
// Collections are not skipped over once checked: a forged collection could otherwise hide a
// corrupt real one inside it.
#include "nm_h5_guard.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define HDF5_SIGNATURE "\x89HDF\r\n\x1a\n"
#define HDF5_SIGNATURE_BYTES 8
#define HEAP_SIGNATURE_AND_VERSION "GCOL\x01\x00\x00\x00" // signature, version 1, 3 reserved zeros
#define HEAP_SIGNATURE_AND_VERSION_BYTES 8
#define HEAP_VERSION_BYTE 4                 // offset of the version byte in the collection
#define HEAP_MIN_COLLECTION_BYTES 4096u     // H5HG_MINSIZE
#define HEAP_ALIGNMENT 8u                   // H5HG_ALIGNMENT
#define MAX_LENGTH_SIZE 32u                 // largest "size of lengths" libhdf5 accepts
#define MAX_PREFIX_BYTES (8u + MAX_LENGTH_SIZE) // collection or object header before alignment
#define SCAN_BLOCK_BYTES ((size_t)1 << 20)
#define WALK_WINDOW_BYTES ((size_t)64 << 10)

typedef struct {
    int fd;
    const char *path;
    uint64_t file_size;
    unsigned length_size;  // Ls
    uint64_t prefix_bytes; // P = align8(8 + Ls): collection header and object header size
    uint64_t walk_budget;  // object headers still allowed to be examined
    uint8_t *block;        // the scan's current block, SCAN_BLOCK_BYTES + MAX_PREFIX_BYTES - 1
    uint64_t block_offset;
    size_t block_len;
    uint8_t *window; // bytes for walking a collection outside the block, WALK_WINDOW_BYTES
    uint64_t window_offset;
    size_t window_len;
} heap_scan;

static uint64_t align8(uint64_t x) { return (x + HEAP_ALIGNMENT - 1) / HEAP_ALIGNMENT * HEAP_ALIGNMENT; }

static unsigned le16(const uint8_t *p) { return (unsigned)p[0] | (unsigned)p[1] << 8; }

// A little-endian length of n bytes; wider than 8 bytes keeps the low 8 (H5F_DECODE_LENGTH).
static uint64_t le_length(const uint8_t *p, unsigned n) {
    uint64_t v = 0;
    for (unsigned i = n < 8 ? n : 8; i-- > 0;) v = v << 8 | p[i];
    return v;
}

static unsigned long long ull(uint64_t v) { return (unsigned long long)v; }

// Reads exactly n bytes at offset; the file must still hold them (it was fstat'ed before).
static nm_status read_at(const heap_scan *s, uint64_t offset, uint8_t *buf, size_t n, nm_error *err) {
    size_t done = 0;
    while (done < n) {
        ssize_t got = pread(s->fd, buf + done, n - done, (off_t)(offset + done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0)
            return nm_fail(err, NM_ERR_IO, "%s: read error at offset %llu: %s", s->path, ull(offset + done),
                           strerror(errno));
        if (got == 0)
            return nm_fail(err, NM_ERR_IO, "%s: unexpected end of file at offset %llu (the file shrank while it was read)",
                           s->path, ull(offset + done));
        done += (size_t)got;
    }
    return NM_OK;
}

__attribute__((format(printf, 4, 5))) static nm_status corrupt(const heap_scan *s, uint64_t collection, nm_error *err,
                                                               const char *fmt, ...) {
    char what[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return nm_fail(err, NM_ERR_FORMAT, "%s: corrupt HDF5 global heap at offset %llu: %s", s->path, ull(collection), what);
}

// The superblock's "size of lengths" into *length_size, or 0 where libhdf5 will not open the
// file anyway (no signature at 0, 512, 1024, 2048, …, an unknown superblock version, a size it
// refuses). The signature search is libhdf5's (H5FD_locate_signature).
static nm_status read_length_size(const heap_scan *s, unsigned *length_size, nm_error *err) {
    *length_size = 0;
    for (uint64_t at = 0; at + 16 <= s->file_size; at = at ? at * 2 : 512) {
        uint8_t sb[16];
        nm_status rc = read_at(s, at, sb, sizeof sb, err);
        if (rc != NM_OK) return rc;
        if (memcmp(sb, HDF5_SIGNATURE, HDF5_SIGNATURE_BYTES) != 0) continue;
        // Version 0/1: signature, 5 version bytes, size of offsets (12), size of lengths (13).
        // Version 2/3: signature, version (8), size of offsets (9), size of lengths (10).
        unsigned version = sb[8], ls = version <= 1 ? sb[13] : version <= 3 ? sb[10] : 0;
        if (ls == 2 || ls == 4 || ls == 8 || ls == 16 || ls == 32) *length_size = ls;
        return NM_OK;
    }
    return NM_OK;
}

// Points *out at n bytes at offset (inside the file) for the walk of a collection: from the
// scan's block when it holds them, else from the walk window, refilled as needed.
static nm_status bytes_at(heap_scan *s, uint64_t offset, size_t n, const uint8_t **out, nm_error *err) {
    if (offset >= s->block_offset && offset + n <= s->block_offset + s->block_len) {
        *out = s->block + (offset - s->block_offset);
        return NM_OK;
    }
    if (!(s->window_len && offset >= s->window_offset && offset + n <= s->window_offset + s->window_len)) {
        uint64_t left = s->file_size - offset;
        size_t len = left < WALK_WINDOW_BYTES ? (size_t)left : WALK_WINDOW_BYTES;
        s->window_len = 0;
        nm_status rc = read_at(s, offset, s->window, len, err);
        if (rc != NM_OK) return rc;
        s->window_offset = offset;
        s->window_len = len;
    }
    *out = s->window + (offset - s->window_offset);
    return NM_OK;
}

// Walks the collection at `at` (its 8 + Ls header bytes are `header`) as libhdf5 will.
static nm_status check_collection(heap_scan *s, uint64_t at, const uint8_t *header, nm_error *err) {
    const uint64_t P = s->prefix_bytes, size = le_length(header + 8, s->length_size);
    if (size < HEAP_MIN_COLLECTION_BYTES)
        return corrupt(s, at, err, "collection size %llu is below HDF5's minimum of %u bytes", ull(size),
                       HEAP_MIN_COLLECTION_BYTES);
    if (size > s->file_size - at)
        return corrupt(s, at, err, "the collection's %llu bytes run past the end of the file (%llu bytes left)", ull(size),
                       ull(s->file_size - at));
    uint64_t pos = P;
    while (pos < size) {
        const uint64_t left = size - pos;
        if (left < P) break; // too small for an object header: free space without one
        if (s->walk_budget == 0)
            return corrupt(s, at, err,
                           "more heap objects than a file of %llu bytes can hold (overlapping forged collections?)",
                           ull(s->file_size));
        s->walk_budget--;
        const uint8_t *obj;
        nm_status rc = bytes_at(s, at + pos, 8 + s->length_size, &obj, err);
        if (rc != NM_OK) return rc;
        const unsigned index = le16(obj);
        const uint64_t obj_size = le_length(obj + 8, s->length_size);
        if (index == 0) {
            if (obj_size < P)
                return corrupt(s, at, err,
                               "the free-space object at byte %llu of the collection has size %llu, less than its own "
                               "%llu-byte header (HDF5 1.10 would loop forever on it)",
                               ull(pos), ull(obj_size), ull(P));
            if (obj_size > left)
                return corrupt(s, at, err,
                               "the free-space object at byte %llu of the collection has size %llu, more than the %llu "
                               "bytes left in the collection",
                               ull(pos), ull(obj_size), ull(left));
            pos += obj_size;
        } else {
            const uint64_t room = left - P;
            if (obj_size > room || align8(obj_size) > room)
                return corrupt(s, at, err,
                               "object %u at byte %llu of the collection has size %llu, more than the %llu bytes left "
                               "in the collection after its header",
                               index, ull(pos), ull(obj_size), ull(room));
            pos += P + align8(obj_size);
        }
    }
    return NM_OK;
}

// Every offset of the file, block by block: each "GCOL" 01 00 00 00 is checked as a collection.
static nm_status scan_file(heap_scan *s, nm_error *err) {
    for (uint64_t block_offset = 0; block_offset < s->file_size; block_offset += SCAN_BLOCK_BYTES) {
        // The block plus the next MAX_PREFIX_BYTES - 1 bytes, so that the header of a collection
        // that starts in the block is complete here whenever the file holds it.
        uint64_t left = s->file_size - block_offset;
        size_t len = left < SCAN_BLOCK_BYTES + MAX_PREFIX_BYTES - 1 ? (size_t)left : SCAN_BLOCK_BYTES + MAX_PREFIX_BYTES - 1;
        s->block_len = 0;
        nm_status rc = read_at(s, block_offset, s->block, len, err);
        if (rc != NM_OK) return rc;
        s->block_offset = block_offset;
        s->block_len = len;
        size_t starts = len < SCAN_BLOCK_BYTES ? len : SCAN_BLOCK_BYTES; // candidates that start in this block
        for (size_t i = 0; i < starts; i++) {
            const uint8_t *g = memchr(s->block + i, 'G', starts - i);
            if (!g) break;
            i = (size_t)(g - s->block);
            size_t avail = len - i; // bytes from here to the end of the block (or of the file)
            // Bytes past the end of the file read as zeros: a match needs the version byte.
            if (avail <= HEAP_VERSION_BYTE) continue;
            size_t cmp = avail < HEAP_SIGNATURE_AND_VERSION_BYTES ? avail : HEAP_SIGNATURE_AND_VERSION_BYTES;
            if (memcmp(g, HEAP_SIGNATURE_AND_VERSION, cmp) != 0) continue;
            uint64_t at = block_offset + i;
            if (avail < 8 + s->length_size)
                return corrupt(s, at, err, "the collection header is cut off by the end of the file (%zu of %u bytes)",
                               avail, 8 + s->length_size);
            rc = check_collection(s, at, g, err);
            if (rc != NM_OK) return rc;
        }
    }
    return NM_OK;
}

nm_status nm_h5_check_global_heaps(const char *path, nm_error *err) {
    if (!path) return nm_fail(err, NM_ERR_INTERNAL, "nm_h5_check_global_heaps: NULL path");
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); // O_NONBLOCK: a FIFO must not block here
    if (fd < 0) return nm_fail(err, NM_ERR_IO, "%s: %s", path, strerror(errno));
    heap_scan s = {.fd = fd, .path = path};
    struct stat before;
    nm_status rc = NM_OK;
    if (fstat(fd, &before) != 0) {
        rc = nm_fail(err, NM_ERR_IO, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(before.st_mode)) {
        rc = nm_fail(err, NM_ERR_IO, "%s: not a regular file", path);
        goto out;
    }
    s.file_size = (uint64_t)before.st_size;
    rc = read_length_size(&s, &s.length_size, err);
    if (rc != NM_OK || s.length_size == 0) goto out; // no superblock libhdf5 accepts: H5Fopen says why
    s.prefix_bytes = align8(8 + s.length_size);
    // Collections do not overlap in a real file, and every counted walk step moves past an
    // object of at least P >= 16 bytes: a valid file needs at most file size / 16 steps in
    // all, half this budget. Only forged, overlapping candidates can exhaust it (without it
    // they would cost time quadratic in the file size).
    s.walk_budget = s.file_size / 8 + 1024;
    s.block = malloc(SCAN_BLOCK_BYTES + MAX_PREFIX_BYTES - 1);
    s.window = malloc(WALK_WINDOW_BYTES);
    if (!s.block || !s.window) {
        rc = NM_NOMEM(err, "the HDF5 global heap check's read buffers");
        goto out;
    }
    rc = scan_file(&s, err);
out:
    free(s.block);
    free(s.window);
    close(fd);
    return rc;
}
