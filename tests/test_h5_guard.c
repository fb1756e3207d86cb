// test_h5_guard.c — the pre-open global heap check (lib/nm_h5_guard.h) on synthetic files: a
// superblock signature and random bytes around hand-built global heap collections (layout in
// lib/nm_h5_guard.c). Valid collections pass at any offset and any "size of lengths"; each
// corruption libhdf5 1.10.8 cannot survive is refused with the file, the collection's offset and
// the problem; "GCOL" bytes that are not a collection are ignored. Traces written by the real
// writer are checked in test_trace.c, the two fuzz findings through the binary in
// test_bad_inputs.c.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nm_h5_guard.h"
#include "test_util.h"

#define MiB ((size_t)1 << 20)

static uint64_t align8(uint64_t x) { return (x + 7) / 8 * 8; }

static void put_le(uint8_t *p, uint64_t v, unsigned n) {
    for (unsigned i = 0; i < n; i++) p[i] = (uint8_t)(i < 8 ? v >> (8 * i) : 0);
}

static void fill_random(nm_test_rng *r, uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(nm_test_rng_next(r) >> 56);
}

// A file of random bytes that starts with an HDF5 superblock signature of the given version
// (0..3) and "size of lengths" ls (byte 13 for versions 0/1, byte 10 for 2/3).
static uint8_t *random_hdf5(nm_test_rng *r, size_t size, int version, unsigned ls) {
    uint8_t *f = malloc(size);
    ck_assert_ptr_nonnull(f);
    fill_random(r, f, size);
    memcpy(f, "\x89HDF\r\n\x1a\n", 8);
    f[8] = (uint8_t)version;
    f[version <= 1 ? 13 : 10] = (uint8_t)ls;
    return f;
}

typedef struct {
    unsigned index;
    uint64_t size; // data bytes
} heap_object;

// Writes a collection of coll_size bytes at `at`: header, the objects (random data, zero
// padding), then a free-space object over the rest when at least P bytes remain (the bytes of
// a smaller tail stay random, as libhdf5 leaves them). obj_at[i] receives object i's offset in
// the collection.
static void put_collection(uint8_t *f, size_t at, uint64_t coll_size, unsigned ls, const heap_object *objs, int n,
                           nm_test_rng *r, uint64_t *obj_at) {
    uint64_t P = align8(8 + ls), pos = P;
    memcpy(f + at, "GCOL\x01\x00\x00\x00", 8);
    put_le(f + at + 8, coll_size, ls);
    for (int i = 0; i < n; i++) {
        ck_assert_uint_le(pos + P + align8(objs[i].size), coll_size);
        uint8_t *o = f + at + pos;
        put_le(o, objs[i].index, 2);
        put_le(o + 2, 1 + nm_test_rng_next(r) % 3, 2); // reference count
        put_le(o + 4, 0, 4);
        put_le(o + 8, objs[i].size, ls);
        fill_random(r, o + P, objs[i].size);
        memset(o + P + objs[i].size, 0, align8(objs[i].size) - objs[i].size);
        if (obj_at) obj_at[i] = pos;
        pos += P + align8(objs[i].size);
    }
    if (coll_size - pos >= P) {
        uint8_t *o = f + at + pos;
        memset(o, 0, 8);
        put_le(o + 8, coll_size - pos, ls);
    }
}

// n random objects (indices 1..n, sizes 0..max_size) that fit a collection of coll_size bytes.
static int random_objects(nm_test_rng *r, heap_object *objs, int n, uint64_t max_size, uint64_t coll_size, unsigned ls) {
    uint64_t P = align8(8 + ls), used = P;
    int k = 0;
    for (; k < n; k++) {
        uint64_t s = nm_test_rng_next(r) % (max_size + 1);
        if (used + P + align8(s) > coll_size) break;
        objs[k].index = (unsigned)k + 1;
        objs[k].size = s;
        used += P + align8(s);
    }
    return k;
}

static char *g_dir;

static nm_status check_bytes(const uint8_t *f, size_t size, nm_error *err) {
    const char *path = nm_test_path(g_dir, "heap.h5");
    ck_assert_int_eq(nm_test_write_file(path, f, size), 0);
    return nm_h5_check_global_heaps(path, err);
}

static void expect_ok(const uint8_t *f, size_t size, const char *what) {
    nm_error err = {0};
    nm_status rc = check_bytes(f, size, &err);
    ck_assert_msg(rc == NM_OK, "%s: refused: %s", what, err.msg);
}

// Refused as corrupt, and the message names the file, the collection's offset and `detail`.
static void expect_corrupt(const uint8_t *f, size_t size, size_t at, const char *detail, const char *what) {
    nm_error err = {0};
    nm_status rc = check_bytes(f, size, &err);
    ck_assert_msg(rc == NM_ERR_FORMAT, "%s: status %d (%s)", what, rc, err.msg);
    char want[128];
    snprintf(want, sizeof want, "heap.h5: corrupt HDF5 global heap at offset %zu: ", at);
    ck_assert_msg(strstr(err.msg, want), "%s: message lacks '%s': %s", what, want, err.msg);
    ck_assert_msg(strstr(err.msg, detail), "%s: message lacks '%s': %s", what, detail, err.msg);
}

static void setup(void) { g_dir = nm_test_tmpdir(); }
static void teardown(void) {
    nm_test_rmtree(g_dir);
    free(g_dir);
}

// ---------------------------------------------------------------------------------------------

// Valid collections at odd offsets, for every "size of lengths": with a free-space object, filled
// exactly, and with a tail smaller than an object header (free space without a header).
START_TEST(test_valid_collections) {
    static const unsigned lengths[] = {2, 4, 8, 16, 32};
    nm_test_rng r = {0x1f83d9abfb41bd6bULL};
    for (int li = 0; li < 5; li++) {
        unsigned ls = lengths[li];
        uint64_t P = align8(8 + ls);
        size_t size = 64 * 1024;
        uint8_t *f = random_hdf5(&r, size, li % 4, ls);
        heap_object objs[64];
        int n = random_objects(&r, objs, 64, 300, 4096, ls);
        put_collection(f, 1001, 4096, ls, objs, n, &r, NULL); // free space at the end
        heap_object exact = {7, 8192 - 2 * P};                // fills the collection exactly
        put_collection(f, 9003, 8192, ls, &exact, 1, &r, NULL);
        heap_object tail = {1, 4096 - 2 * P - 8}; // leaves an 8-byte tail without a header
        put_collection(f, 20011, 4096, ls, &tail, 1, &r, NULL);
        heap_object empties[3] = {{1, 0}, {65535, 0}, {2, 1}};
        put_collection(f, 30000, 4104, ls, empties, 3, &r, NULL);
        put_collection(f, size - 4096, 4096, ls, objs, n, &r, NULL); // ends at the end of the file
        char what[64];
        snprintf(what, sizeof what, "size of lengths %u", ls);
        expect_ok(f, size, what);
        free(f);
    }
}
END_TEST

START_TEST(test_object_larger_than_collection) {
    nm_test_rng r = {0x5be0cd19137e2179ULL};
    size_t size = 32 * 1024, at = 5003;
    uint8_t *f = random_hdf5(&r, size, 3, 8);
    heap_object objs[4] = {{1, 13}, {2, 100}, {3, 7}, {4, 0}};
    uint64_t obj_at[4];
    put_collection(f, at, 4096, 8, objs, 4, &r, obj_at);
    expect_ok(f, size, "intact");
    static const uint64_t bad_sizes[] = {4096, (uint64_t)1 << 51, UINT64_MAX, UINT64_MAX - 6};
    for (int i = 0; i < 4; i++) {
        put_le(f + at + obj_at[1] + 8, bad_sizes[i], 8);
        expect_corrupt(f, size, at, "object 2 at byte", "object size past the collection");
    }
    // The last object may fill the collection up to its end, not one byte more.
    uint64_t room = 4096 - obj_at[3] - 16;
    put_le(f + at + obj_at[1] + 8, 100, 8);
    put_le(f + at + obj_at[3] + 8, room, 8);
    expect_ok(f, size, "last object up to the end");
    put_le(f + at + obj_at[3] + 8, room + 1, 8);
    expect_corrupt(f, size, at, "object 4 at byte", "last object one byte too long");
    free(f);
}
END_TEST

START_TEST(test_free_space_sizes) {
    nm_test_rng r = {0x9b05688c2b3e6c1fULL};
    size_t size = 16 * 1024, at = 2051;
    uint8_t *f = random_hdf5(&r, size, 2, 8);
    heap_object objs[2] = {{1, 40}, {2, 9}};
    uint64_t obj_at[2];
    put_collection(f, at, 4096, 8, objs, 2, &r, obj_at);
    uint64_t free_at = obj_at[1] + 16 + 16, left = 4096 - free_at;
    expect_ok(f, size, "intact");
    put_le(f + at + free_at + 8, 0, 8);
    expect_corrupt(f, size, at, "free-space object at byte 104 of the collection has size 0", "zero free space");
    put_le(f + at + free_at + 8, 8, 8);
    expect_corrupt(f, size, at, "has size 8, less than its own 16-byte header", "free space smaller than its header");
    put_le(f + at + free_at + 8, left + 8, 8);
    expect_corrupt(f, size, at, "more than the", "free space past the collection");
    // Free space that ends early: libhdf5 walks on, and so does the check (here into an object
    // whose size runs past the collection).
    put_le(f + at + free_at + 8, 16, 8);
    put_le(f + at + free_at + 16, 3, 2);
    put_le(f + at + free_at + 16 + 8, 5000, 8);
    expect_corrupt(f, size, at, "object 3 at byte 120", "an object after a short free-space object");
    put_le(f + at + free_at + 16 + 8, left - 32 - 5, 8);
    expect_ok(f, size, "a short free-space object and a valid object after it");
    free(f);
}
END_TEST

START_TEST(test_collection_sizes_and_truncation) {
    nm_test_rng r = {0x510e527fade682d1ULL};
    size_t size = 20 * 1024, at = 7777;
    uint8_t *f = random_hdf5(&r, size, 3, 8);
    heap_object obj = {1, 200};
    put_collection(f, at, 4096, 8, &obj, 1, &r, NULL);
    expect_ok(f, size, "intact");
    put_le(f + at + 8, 4095, 8);
    expect_corrupt(f, size, at, "collection size 4095 is below HDF5's minimum of 4096 bytes", "4095-byte collection");
    put_le(f + at + 8, 0, 8);
    expect_corrupt(f, size, at, "collection size 0", "0-byte collection");
    put_le(f + at + 8, size - at + 8, 8);
    expect_corrupt(f, size, at, "run past the end of the file (12703 bytes left)", "collection past the end of the file");
    put_le(f + at + 8, 4096, 8);
    // The file truncated inside the collection (libhdf5 would read zeros past the end).
    expect_corrupt(f, at + 3000, at, "past the end of the file (3000 bytes left)", "truncated inside the collection");
    // Truncated inside the collection header: with the version byte it is a collection, cut off.
    expect_corrupt(f, at + 12, at, "header is cut off by the end of the file (12 of 16 bytes)", "header cut off");
    expect_corrupt(f, at + 5, at, "cut off", "cut after the version byte");
    expect_ok(f, at + 4, "\"GCOL\" at the very end (libhdf5 reads version 0: not a collection)");
    expect_ok(f, at + 3, "\"GCO\" at the very end");
    free(f);
}
END_TEST

// "GCOL" inside other data: skipped unless version 1 and three zero reserved bytes follow.
START_TEST(test_gcol_in_random_data) {
    nm_test_rng r = {0xbb67ae8584caa73bULL};
    size_t size = 3 * MiB;
    uint8_t *f = random_hdf5(&r, size, 3, 8);
    static const char *not_heaps[] = {"GCOL\x02\x00\x00\x00", "GCOL\x00\x00\x00\x00", "GCOL\x01\x00\x00\x01",
                                      "GCOL\x01\x01\x00\x00", "GCOL\xff\xff\xff\xff", "GCOLGCOL"};
    for (int i = 0; i < 3000; i++) {
        size_t at = 16 + nm_test_rng_next(&r) % (size - 64);
        memcpy(f + at, not_heaps[i % 6], 8); // followed by random "sizes"
    }
    memcpy(f + MiB - 2, "GCOL\x07", 5); // across the scan's block boundary
    expect_ok(f, size, "\"GCOL\" that is not a collection");
    // A real collection among them is still checked.
    heap_object obj = {1, 64};
    put_collection(f, 2 * MiB + 3, 4096, 8, &obj, 1, &r, NULL);
    expect_ok(f, size, "with one valid collection");
    put_le(f + 2 * MiB + 3 + 16 + 8, 5000, 8);
    expect_corrupt(f, size, 2 * MiB + 3, "object 1 at byte 16", "a corrupt collection among false ones");
    free(f);
}
END_TEST

// Collections across the 1 MiB scan blocks and larger than the 64 KiB walk window.
START_TEST(test_block_boundaries) {
    nm_test_rng r = {0x3c6ef372fe94f82bULL};
    size_t size = 5 * MiB / 2;
    uint8_t *f = random_hdf5(&r, size, 3, 8);
    heap_object small[32], big[4000];
    int ns = random_objects(&r, small, 32, 200, 4096, 8);
    size_t straddle = MiB - 3; // "GCOL" itself crosses the boundary
    put_collection(f, straddle, 4096, 8, small, ns, &r, NULL);
    uint64_t big_size = 300 * 1024, big_at[4000];
    size_t big_off = 2 * MiB - 100 * 1024 + 5; // crosses 2 MiB
    int nb = random_objects(&r, big, 4000, 150, big_size, 8);
    put_collection(f, big_off, big_size, 8, big, nb, &r, big_at);
    put_collection(f, big_off + big_size + 11, 4096, 8, small, ns, &r, NULL); // after it, in the last block
    expect_ok(f, size, "collections across blocks");
    put_le(f + straddle + 16 + 8, 4096, 8);
    expect_corrupt(f, size, straddle, "object 1 at byte 16", "the collection across the first boundary");
    put_le(f + straddle + 16 + 8, small[0].size, 8);
    put_le(f + big_off + big_at[nb - 1] + 8, big_size, 8);
    char detail[64];
    snprintf(detail, sizeof detail, "object %d at byte %llu", nb, (unsigned long long)big_at[nb - 1]);
    expect_corrupt(f, size, big_off, detail, "the last object of a 300 KiB collection");
    put_le(f + big_off + big_at[nb - 1] + 8, big[nb - 1].size, 8);
    expect_ok(f, size, "repaired");
    free(f);
}
END_TEST

// Where libhdf5 refuses the file anyway the check stays out of the way; a superblock after a
// user block (at 512) is found as libhdf5 finds it.
START_TEST(test_superblock) {
    nm_test_rng r = {0x6a09e667bb67ae85ULL};
    size_t size = 16 * 1024, at = 3001;
    uint8_t *f = random_hdf5(&r, size, 3, 8);
    heap_object obj = {1, 64};
    put_collection(f, at, 4096, 8, &obj, 1, &r, NULL);
    put_le(f + at + 16 + 8, 9999, 8); // corrupt
    expect_corrupt(f, size, at, "object 1", "version 3 superblock");
    f[8] = 4;
    expect_ok(f, size, "superblock version 4 (libhdf5 1.10 refuses it)");
    f[8] = 3;
    f[10] = 7;
    expect_ok(f, size, "size of lengths 7 (libhdf5 refuses it)");
    f[0] = 'x';
    expect_ok(f, size, "no superblock (not an HDF5 file)");
    fill_random(&r, f, 512);
    memcpy(f + 512, "\x89HDF\r\n\x1a\n\x00", 9);
    f[512 + 13] = 8;
    expect_corrupt(f, size, at, "object 1", "superblock after a 512-byte user block");
    free(f);
}
END_TEST

START_TEST(test_io_errors) {
    nm_error err = {0};
    const char *missing = nm_test_path(g_dir, "missing.h5");
    ck_assert_int_eq(nm_h5_check_global_heaps(missing, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "missing.h5") && strstr(err.msg, strerror(ENOENT)), "%s", err.msg);
    ck_assert_int_eq(nm_h5_check_global_heaps(g_dir, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "not a regular file"), "%s", err.msg);
    expect_ok((const uint8_t *)"", 0, "an empty file");
}
END_TEST

// A file that passed and then changed in place (same size) is checked again: nothing about a
// passed file is remembered.
START_TEST(test_changed_file_is_checked_again) {
    nm_test_rng r = {0x243f6a8885a308d3ULL};
    size_t size = 16 * 1024, at = 4321;
    uint8_t *f = random_hdf5(&r, size, 3, 8);
    heap_object obj = {1, 64};
    put_collection(f, at, 4096, 8, &obj, 1, &r, NULL);
    const char *path = nm_test_path(g_dir, "settled.h5");
    ck_assert_int_eq(nm_test_write_file(path, f, size), 0);
    nm_error err = {0};
    ck_assert_msg(nm_h5_check_global_heaps(path, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_h5_check_global_heaps(path, &err) == NM_OK, "%s", err.msg);
    int fd = open(path, O_WRONLY);
    ck_assert_int_ge(fd, 0);
    uint8_t zero_size[8] = {0};
    ck_assert_int_eq(pwrite(fd, zero_size, 8, (off_t)(at + 16 + 16 + 64 + 8)), 8); // free space size 0
    close(fd);
    ck_assert_int_eq(nm_h5_check_global_heaps(path, &err), NM_ERR_FORMAT);
    ck_assert_msg(strstr(err.msg, "size 0"), "%s", err.msg);
    free(f);
}
END_TEST

NM_TEST_SUITE(h5_guard) {
    Suite *s = suite_create("h5_guard");
    TCase *tc = tcase_create("global_heaps");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_valid_collections);
    tcase_add_test(tc, test_object_larger_than_collection);
    tcase_add_test(tc, test_free_space_sizes);
    tcase_add_test(tc, test_collection_sizes_and_truncation);
    tcase_add_test(tc, test_gcol_in_random_data);
    tcase_add_test(tc, test_block_boundaries);
    tcase_add_test(tc, test_superblock);
    tcase_add_test(tc, test_io_errors);
    tcase_add_test(tc, test_changed_file_is_checked_again);
    suite_add_tcase(s, tc);
    return s;
}
