// test_image.c — image decoding (PNG/JPEG), resizing and normalisation (lib/nm_image.c).
//
// Test images are written here with libpng/libjpeg from fresh random pixels, decoded with
// nm_image_load and compared with what was written (exactly for PNG, closely for JPEG).
// Bad inputs are hand-made (truncated, corrupted, huge headers) and must fail with the right
// status, a message naming the file, and no image left behind.
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h> // needs <stdio.h> first
#include <png.h>

#include "nm_image.h"
#include "test_util.h"

// ---------------------------------------------------------------------------------------------
// Helpers

static uint8_t *random_bytes(nm_test_rng *rng, size_t n) {
    uint8_t *p = malloc(n);
    ck_assert_ptr_nonnull(p);
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(nm_test_rng_next(rng) >> 56);
    return p;
}

static uint8_t *read_whole(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long len = ftell(f);
    ck_assert_int_ge(len, 0);
    rewind(f);
    uint8_t *p = malloc((size_t)len + 1);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(fread(p, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return p;
}

static uint32_t get_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t crc32_png(const uint8_t *p, size_t n) { // the PNG/zlib CRC, bitwise
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

// round(v * 255 / 65535): the documented 16 -> 8 bit rule.
static uint8_t scale16(unsigned v) { return (uint8_t)floor(v * 255.0 / 65535.0 + 0.5); }

// round((c*a + 255*(255 - a)) / 255) computed in double: compositing over white.
static uint8_t over_white(unsigned c, unsigned a) { return (uint8_t)floor((c * a + 255.0 * (255 - a)) / 255.0 + 0.5); }

typedef struct {
    int w, h, color_type, depth, interlace;
    const uint8_t *raw;             // rows packed as PNG stores them (16-bit big-endian)
    const png_color *palette;
    int npalette;
    const uint8_t *trns;            // palette alpha
    int ntrns;
    const png_color_16 *trns_color; // grey/RGB colour key
} png_spec;

static size_t png_spec_rowbytes(const png_spec *s) {
    int ch = s->color_type == PNG_COLOR_TYPE_GRAY || s->color_type == PNG_COLOR_TYPE_PALETTE ? 1
             : s->color_type == PNG_COLOR_TYPE_GRAY_ALPHA                                    ? 2
             : s->color_type == PNG_COLOR_TYPE_RGB                                           ? 3
                                                                                             : 4;
    return ((size_t)s->w * ch * s->depth + 7) / 8;
}

static int png_write_run(png_structp png, png_infop info, const png_spec *s, FILE *f, png_bytep *rows) {
    if (setjmp(png_jmpbuf(png))) return -1;
    png_init_io(png, f);
    png_set_IHDR(png, info, s->w, s->h, s->depth, s->color_type,
                 s->interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    if (s->palette) png_set_PLTE(png, info, s->palette, s->npalette);
    if (s->trns || s->trns_color) png_set_tRNS(png, info, s->trns, s->ntrns, s->trns_color);
    png_write_info(png, info);
    png_write_image(png, rows);
    png_write_end(png, NULL);
    return 0;
}

static void write_png(const char *path, const png_spec *s) {
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    ck_assert_ptr_nonnull(png);
    png_infop info = png_create_info_struct(png);
    ck_assert_ptr_nonnull(info);
    png_bytep *rows = malloc((size_t)s->h * sizeof *rows);
    ck_assert_ptr_nonnull(rows);
    for (int y = 0; y < s->h; y++) rows[y] = (png_bytep)s->raw + (size_t)y * png_spec_rowbytes(s);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    int rc = png_write_run(png, info, s, f, rows);
    ck_assert_int_eq(fclose(f), 0);
    png_destroy_write_struct(&png, &info);
    free(rows);
    ck_assert_msg(rc == 0, "libpng failed to write %s", path);
}

// comps 3 (RGB), 1 (grey) or 4 (CMYK); no chroma subsampling, so small errors at high quality.
static void write_jpeg(const char *path, int w, int h, const uint8_t *pix, int comps, int quality, int progressive) {
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr je;
    ci.err = jpeg_std_error(&je);
    jpeg_create_compress(&ci);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    jpeg_stdio_dest(&ci, f);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = comps;
    ci.in_color_space = comps == 1 ? JCS_GRAYSCALE : comps == 3 ? JCS_RGB : JCS_CMYK;
    jpeg_set_defaults(&ci);
    jpeg_set_quality(&ci, quality, TRUE);
    for (int i = 0; i < ci.num_components; i++) ci.comp_info[i].h_samp_factor = ci.comp_info[i].v_samp_factor = 1;
    if (progressive) jpeg_simple_progression(&ci);
    jpeg_start_compress(&ci, TRUE);
    while (ci.next_scanline < ci.image_height) {
        JSAMPROW r = (JSAMPROW)(pix + (size_t)ci.next_scanline * w * comps);
        jpeg_write_scanlines(&ci, &r, 1);
    }
    jpeg_finish_compress(&ci);
    ck_assert_int_eq(fclose(f), 0);
    jpeg_destroy_compress(&ci);
}

// A smooth random image (photo-like: gradients, waves, mild noise), (h, w, comps).
static uint8_t *smooth_image(nm_test_rng *rng, int w, int h, int comps) {
    uint8_t *p = malloc((size_t)w * h * comps);
    ck_assert_ptr_nonnull(p);
    double ph[4], fx[4], fy[4];
    for (int c = 0; c < 4; c++) {
        ph[c] = 6.283 * nm_test_rng_uniform(rng);
        fx[c] = 0.05 + 0.2 * nm_test_rng_uniform(rng);
        fy[c] = 0.05 + 0.2 * nm_test_rng_uniform(rng);
    }
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < comps; c++) {
                double v = 128 + 80 * sin(fx[c] * x + fy[c] * y + ph[c]) + 2 * nm_test_rng_normal(rng);
                p[((size_t)y * w + x) * comps + c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
    return p;
}

static void load_ok(nm_image *img, const char *path, int w, int h) {
    nm_error err;
    nm_error_clear(&err);
    nm_status st = nm_image_load(img, path, &err);
    ck_assert_msg(st == NM_OK, "%s: %s", path, err.msg);
    ck_assert_int_eq(img->width, w);
    ck_assert_int_eq(img->height, h);
    ck_assert_ptr_nonnull(img->rgb);
}

// The failure contract: the status, the message names the file (and says `what`), no image.
static void check_failed(nm_status st, const nm_image *img, const nm_error *err, nm_status want, const char *name,
                         const char *what) {
    ck_assert_msg(st == want, "%s: got %s (%s), want %s", name, nm_status_name(st), err->msg, nm_status_name(want));
    ck_assert_int_eq(err->code, want);
    ck_assert_msg(strstr(err->msg, name) != NULL, "message does not name %s: %s", name, err->msg);
    if (what) ck_assert_msg(strstr(err->msg, what) != NULL, "message lacks \"%s\": %s", what, err->msg);
    ck_assert_ptr_null(img->rgb);
    ck_assert_int_eq(img->width, 0);
    ck_assert_int_eq(img->height, 0);
}

static void load_fails(const char *path, nm_status want, const char *what) {
    uint8_t junk[4] = {1, 2, 3, 4};
    nm_image img = {.width = 5, .height = 5, .rgb = junk}; // an output: old contents are ignored
    nm_error err;
    nm_error_clear(&err);
    nm_status st = nm_image_load(&img, path, &err);
    check_failed(st, &img, &err, want, path, what);
}

static void decode_fails(const uint8_t *data, size_t n, const char *name, nm_status want, const char *what) {
    nm_image img = {0};
    nm_error err;
    nm_error_clear(&err);
    nm_status st = nm_image_decode(&img, data, n, name, &err);
    check_failed(st, &img, &err, want, name, what);
}

// Offset of the first chunk of `type` in a PNG (its length field), or 0.
static size_t png_find_chunk(const uint8_t *p, size_t n, const char *type) {
    for (size_t off = 8; off + 12 <= n; off += 12 + get_be32(p + off))
        if (memcmp(p + off + 4, type, 4) == 0) return off;
    return 0;
}

// Appends a chunk with a correct CRC; returns the new length.
static size_t png_put_chunk(uint8_t *out, size_t pos, const char *type, const uint8_t *data, uint32_t len) {
    put_be32(out + pos, len);
    memcpy(out + pos + 4, type, 4);
    if (len) memcpy(out + pos + 8, data, len);
    put_be32(out + pos + 8 + len, crc32_png(out + pos + 4, 4 + (size_t)len));
    return pos + 12 + len;
}

// A hand-made PNG whose IHDR claims w x h RGB (the CRCs are right; the IDAT is a tiny stub).
static size_t handmade_png(uint8_t *out, uint32_t w, uint32_t h) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    uint8_t ihdr[13] = {0};
    put_be32(ihdr, w);
    put_be32(ihdr + 4, h);
    ihdr[8] = 8; // bit depth
    ihdr[9] = 2; // RGB
    static const uint8_t idat[] = {0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01}; // zlib("\0")
    memcpy(out, sig, 8);
    size_t n = png_put_chunk(out, 8, "IHDR", ihdr, 13);
    n = png_put_chunk(out, n, "IDAT", idat, sizeof idat);
    return png_put_chunk(out, n, "IEND", NULL, 0);
}

// ---------------------------------------------------------------------------------------------
// PNG decoding

START_TEST(test_png_rgb) {
    nm_test_rng rng = {101};
    char *dir = nm_test_tmpdir();
    for (int interlace = 0; interlace <= 1; interlace++) {
        int w = 37, h = 23;
        uint8_t *raw = random_bytes(&rng, (size_t)w * h * 3);
        png_spec s = {.w = w, .h = h, .color_type = PNG_COLOR_TYPE_RGB, .depth = 8, .interlace = interlace, .raw = raw};
        const char *path = nm_test_path(dir, interlace ? "adam7.png" : "rgb.png");
        write_png(path, &s);
        nm_image img;
        load_ok(&img, path, w, h);
        ck_assert_msg(memcmp(img.rgb, raw, (size_t)w * h * 3) == 0, "%s: pixels differ", path);
        nm_image_free(&img);
        ck_assert_ptr_null(img.rgb);
        free(raw);
    }
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_png_rgba_over_white) {
    nm_test_rng rng = {102};
    char *dir = nm_test_tmpdir();
    int w = 29, h = 17;
    size_t n = (size_t)w * h;
    uint8_t *raw = random_bytes(&rng, n * 4);
    raw[3] = 0;     // fully transparent -> white
    raw[7] = 255;   // opaque -> the colour itself
    raw[11] = 128;  // half
    png_spec s = {.w = w, .h = h, .color_type = PNG_COLOR_TYPE_RGB_ALPHA, .depth = 8, .raw = raw};
    const char *path = nm_test_path(dir, "rgba.png");
    write_png(path, &s);
    nm_image img;
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < 3; c++)
            ck_assert_msg(img.rgb[i * 3 + c] == over_white(raw[i * 4 + c], raw[i * 4 + 3]),
                          "pixel %zu channel %d: %d, want %d (c=%d a=%d)", i, c, img.rgb[i * 3 + c],
                          over_white(raw[i * 4 + c], raw[i * 4 + 3]), raw[i * 4 + c], raw[i * 4 + 3]);
    ck_assert_int_eq(img.rgb[0], 255);
    ck_assert_int_eq(img.rgb[3], raw[4]);
    nm_image_free(&img);

    // 16-bit RGBA: samples are scaled to 8 bits first, then composited.
    uint8_t *raw16 = random_bytes(&rng, n * 8);
    s = (png_spec){.w = w, .h = h, .color_type = PNG_COLOR_TYPE_RGB_ALPHA, .depth = 16, .raw = raw16};
    path = nm_test_path(dir, "rgba16.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = raw16 + i * 8;
        uint8_t a = scale16((unsigned)p[6] << 8 | p[7]);
        for (int c = 0; c < 3; c++)
            ck_assert_int_eq(img.rgb[i * 3 + c], over_white(scale16((unsigned)p[2 * c] << 8 | p[2 * c + 1]), a));
    }
    nm_image_free(&img);
    free(raw);
    free(raw16);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_png_grey) {
    nm_test_rng rng = {103};
    char *dir = nm_test_tmpdir();
    int w = 19, h = 11;
    size_t n = (size_t)w * h;
    nm_image img;

    // 8-bit grey: R = G = B = v.
    uint8_t *g8 = random_bytes(&rng, n);
    png_spec s = {.w = w, .h = h, .color_type = PNG_COLOR_TYPE_GRAY, .depth = 8, .raw = g8};
    const char *path = nm_test_path(dir, "grey8.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < 3; c++) ck_assert_int_eq(img.rgb[i * 3 + c], g8[i]);
    nm_image_free(&img);

    // 2-bit grey: v in 0..3 becomes v * 85.
    size_t rb = ((size_t)w * 2 + 7) / 8;
    uint8_t *g2 = random_bytes(&rng, rb * h);
    s = (png_spec){.w = w, .h = h, .color_type = PNG_COLOR_TYPE_GRAY, .depth = 2, .raw = g2};
    path = nm_test_path(dir, "grey2.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            int v = (g2[y * rb + x / 4] >> (6 - 2 * (x % 4))) & 3;
            for (int c = 0; c < 3; c++) ck_assert_int_eq(img.rgb[((size_t)y * w + x) * 3 + c], v * 85);
        }
    nm_image_free(&img);

    // 16-bit grey: round(v * 255 / 65535).
    uint8_t *g16 = random_bytes(&rng, n * 2);
    s = (png_spec){.w = w, .h = h, .color_type = PNG_COLOR_TYPE_GRAY, .depth = 16, .raw = g16};
    path = nm_test_path(dir, "grey16.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < 3; c++) ck_assert_int_eq(img.rgb[i * 3 + c], scale16((unsigned)g16[2 * i] << 8 | g16[2 * i + 1]));
    nm_image_free(&img);

    // Grey + alpha: composited over white.
    uint8_t *ga = random_bytes(&rng, n * 2);
    s = (png_spec){.w = w, .h = h, .color_type = PNG_COLOR_TYPE_GRAY_ALPHA, .depth = 8, .raw = ga};
    path = nm_test_path(dir, "grey_alpha.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < 3; c++) ck_assert_int_eq(img.rgb[i * 3 + c], over_white(ga[2 * i], ga[2 * i + 1]));
    nm_image_free(&img);

    free(g8);
    free(g2);
    free(g16);
    free(ga);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_png_palette) {
    nm_test_rng rng = {104};
    char *dir = nm_test_tmpdir();
    int w = 23, h = 13, npal = 20, ntrns = 6;
    size_t n = (size_t)w * h;
    png_color pal[20];
    uint8_t *pc = random_bytes(&rng, (size_t)npal * 3);
    for (int i = 0; i < npal; i++) pal[i] = (png_color){pc[3 * i], pc[3 * i + 1], pc[3 * i + 2]};
    uint8_t *trns = random_bytes(&rng, (size_t)ntrns); // entries 0..5 partly transparent
    trns[0] = 0;
    uint8_t *idx = random_bytes(&rng, n);
    for (size_t i = 0; i < n; i++) idx[i] %= (uint8_t)npal;
    nm_image img;

    png_spec s = {.w = w, .h = h, .color_type = PNG_COLOR_TYPE_PALETTE, .depth = 8, .raw = idx, .palette = pal,
                  .npalette = npal};
    const char *path = nm_test_path(dir, "palette.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++) {
        const png_color *p = &pal[idx[i]];
        ck_assert_int_eq(img.rgb[i * 3 + 0], p->red);
        ck_assert_int_eq(img.rgb[i * 3 + 1], p->green);
        ck_assert_int_eq(img.rgb[i * 3 + 2], p->blue);
    }
    nm_image_free(&img);

    s.trns = trns;
    s.ntrns = ntrns;
    path = nm_test_path(dir, "palette_trns.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++) {
        const png_color *p = &pal[idx[i]];
        unsigned a = idx[i] < ntrns ? trns[idx[i]] : 255;
        ck_assert_int_eq(img.rgb[i * 3 + 0], over_white(p->red, a));
        ck_assert_int_eq(img.rgb[i * 3 + 1], over_white(p->green, a));
        ck_assert_int_eq(img.rgb[i * 3 + 2], over_white(p->blue, a));
    }
    nm_image_free(&img);

    // 4-bit palette (packed indices).
    size_t rb = ((size_t)w * 4 + 7) / 8;
    uint8_t *idx4 = random_bytes(&rng, rb * h);
    for (size_t i = 0; i < rb * h; i++) idx4[i] &= 0x77; // indices 0..7 < 16 entries
    s = (png_spec){.w = w, .h = h, .color_type = PNG_COLOR_TYPE_PALETTE, .depth = 4, .raw = idx4, .palette = pal,
                   .npalette = 16};
    path = nm_test_path(dir, "palette4.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            int k = (idx4[y * rb + x / 2] >> (x % 2 ? 0 : 4)) & 15;
            ck_assert_int_eq(img.rgb[((size_t)y * w + x) * 3 + 0], pal[k].red);
            ck_assert_int_eq(img.rgb[((size_t)y * w + x) * 3 + 2], pal[k].blue);
        }
    nm_image_free(&img);

    free(pc);
    free(trns);
    free(idx);
    free(idx4);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_png_16bit_and_colour_key) {
    nm_test_rng rng = {105};
    char *dir = nm_test_tmpdir();
    int w = 21, h = 9;
    size_t n = (size_t)w * h;
    nm_image img;

    uint8_t *raw16 = random_bytes(&rng, n * 6);
    png_spec s = {.w = w, .h = h, .color_type = PNG_COLOR_TYPE_RGB, .depth = 16, .raw = raw16};
    const char *path = nm_test_path(dir, "rgb16.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n * 3; i++) ck_assert_int_eq(img.rgb[i], scale16((unsigned)raw16[2 * i] << 8 | raw16[2 * i + 1]));
    nm_image_free(&img);

    // An RGB colour key (tRNS): pixels of exactly that colour are transparent -> white.
    uint8_t *raw = random_bytes(&rng, n * 3);
    for (size_t i = 0; i < n; i += 3) memcpy(raw + i * 3, (const uint8_t[]){10, 20, 30}, 3);
    png_color_16 key = {.red = 10, .green = 20, .blue = 30};
    s = (png_spec){.w = w, .h = h, .color_type = PNG_COLOR_TYPE_RGB, .depth = 8, .raw = raw, .trns_color = &key};
    path = nm_test_path(dir, "rgb_key.png");
    write_png(path, &s);
    load_ok(&img, path, w, h);
    for (size_t i = 0; i < n; i++) {
        int keyed = raw[3 * i] == 10 && raw[3 * i + 1] == 20 && raw[3 * i + 2] == 30;
        for (int c = 0; c < 3; c++) ck_assert_int_eq(img.rgb[3 * i + c], keyed ? 255 : raw[3 * i + c]);
    }
    nm_image_free(&img);
    free(raw16);
    free(raw);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// JPEG decoding

// Max and mean absolute difference between two byte arrays.
static void diff_stats(const uint8_t *a, const uint8_t *b, size_t n, int *max, double *mean) {
    long sum = 0;
    *max = 0;
    for (size_t i = 0; i < n; i++) {
        int d = abs((int)a[i] - (int)b[i]);
        if (d > *max) *max = d;
        sum += d;
    }
    *mean = (double)sum / (double)n;
}

START_TEST(test_jpeg_rgb) {
    nm_test_rng rng = {201};
    char *dir = nm_test_tmpdir();
    int w = 45, h = 31;
    size_t n = (size_t)w * h * 3;
    uint8_t *pix = smooth_image(&rng, w, h, 3);
    for (int progressive = 0; progressive <= 1; progressive++) {
        const char *path = nm_test_path(dir, progressive ? "progressive.jpg" : "baseline.jpg");
        write_jpeg(path, w, h, pix, 3, 98, progressive);
        nm_image img;
        load_ok(&img, path, w, h);
        int max;
        double mean;
        diff_stats(img.rgb, pix, n, &max, &mean);
        ck_assert_msg(max <= 10 && mean < 2.0, "%s: max diff %d, mean %.2f", path, max, mean);
        nm_image_free(&img);
    }
    free(pix);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_jpeg_grey) {
    nm_test_rng rng = {202};
    char *dir = nm_test_tmpdir();
    int w = 33, h = 20;
    size_t n = (size_t)w * h;
    uint8_t *pix = smooth_image(&rng, w, h, 1);
    const char *path = nm_test_path(dir, "grey.jpg");
    write_jpeg(path, w, h, pix, 1, 100, 0);
    nm_image img;
    load_ok(&img, path, w, h);
    int max = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_eq(img.rgb[3 * i], img.rgb[3 * i + 1]);
        ck_assert_int_eq(img.rgb[3 * i], img.rgb[3 * i + 2]);
        int d = abs((int)img.rgb[3 * i] - pix[i]);
        if (d > max) max = d;
    }
    ck_assert_msg(max <= 3, "max diff %d", max);
    nm_image_free(&img);
    free(pix);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_jpeg_cmyk) {
    // libjpeg writes CMYK with an Adobe marker, so the reader takes the values as inverted
    // (Photoshop's convention): R = C' * K' / 255 with C', K' the stored values.
    nm_test_rng rng = {203};
    char *dir = nm_test_tmpdir();
    int w = 24, h = 16;
    size_t n = (size_t)w * h;
    uint8_t *pix = smooth_image(&rng, w, h, 4);
    const char *path = nm_test_path(dir, "cmyk.jpg");
    write_jpeg(path, w, h, pix, 4, 100, 0);
    nm_image img;
    load_ok(&img, path, w, h);
    int max = 0;
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < 3; c++) {
            double want = pix[4 * i + c] * pix[4 * i + 3] / 255.0;
            int d = (int)fabs(img.rgb[3 * i + c] - want);
            if (d > max) max = d;
        }
    ck_assert_msg(max <= 4, "max diff %d", max);
    nm_image_free(&img);
    free(pix);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_format_by_signature) {
    // A PNG named .jpg and a JPEG named .png decode by what they are.
    nm_test_rng rng = {204};
    char *dir = nm_test_tmpdir();
    int w = 8, h = 6;
    uint8_t *raw = random_bytes(&rng, (size_t)w * h * 3);
    png_spec s = {.w = w, .h = h, .color_type = PNG_COLOR_TYPE_RGB, .depth = 8, .raw = raw};
    const char *png_path = nm_test_path(dir, "really_a_png.jpg");
    write_png(png_path, &s);
    const char *jpg_path = nm_test_path(dir, "really_a_jpeg.png");
    write_jpeg(jpg_path, w, h, raw, 3, 95, 0);
    nm_image img;
    load_ok(&img, png_path, w, h);
    ck_assert_int_eq(memcmp(img.rgb, raw, (size_t)w * h * 3), 0);
    nm_image_free(&img);
    load_ok(&img, jpg_path, w, h);
    nm_image_free(&img);

    // The same bytes from memory; NULL name -> "<memory>" in messages.
    size_t len;
    uint8_t *bytes = read_whole(png_path, &len);
    nm_error err;
    ck_assert_int_eq(nm_image_decode(&img, bytes, len, "mem.png", &err), NM_OK);
    ck_assert_int_eq(memcmp(img.rgb, raw, (size_t)w * h * 3), 0);
    nm_image_free(&img);
    decode_fails(bytes, 5, "<memory>", NM_ERR_FORMAT, NULL);
    ck_assert_int_eq(nm_image_decode(&img, bytes, 5, NULL, &err), NM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(err.msg, "<memory>"));
    free(bytes);
    free(raw);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Bad inputs

START_TEST(test_bad_files) {
    char *dir = nm_test_tmpdir();
    load_fails(nm_test_path(dir, "missing.png"), NM_ERR_IO, "No such file or directory");
    load_fails(dir, NM_ERR_IO, "directory");

    const char *empty = nm_test_path(dir, "empty.png");
    ck_assert_int_eq(nm_test_write_file(empty, "", 0), 0);
    load_fails(empty, NM_ERR_FORMAT, "empty");

    const char *text = nm_test_path(dir, "notes.png");
    const char *words = "These are not the pixels you are looking for.\n";
    ck_assert_int_eq(nm_test_write_file(text, words, strlen(words)), 0);
    load_fails(text, NM_ERR_FORMAT, "not a PNG or JPEG file");

    const char *gif = nm_test_path(dir, "anim.gif");
    ck_assert_int_eq(nm_test_write_file(gif, "GIF89a\x01\x00\x01\x00\x00\x00\x00;", 14), 0);
    load_fails(gif, NM_ERR_UNSUPPORTED, "GIF");

    // Over the file-size limit (512 MiB): a sparse file, refused before reading.
    const char *big = nm_test_path(dir, "huge_file.png");
    FILE *f = fopen(big, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(ftruncate(fileno(f), (off_t)600 * 1024 * 1024), 0);
    fclose(f);
    load_fails(big, NM_ERR_LIMIT, "limit");

    // NULL arguments are refused, not crashed on.
    nm_error err;
    ck_assert_int_eq(nm_image_load(NULL, "x.png", &err), NM_ERR_INVALID);
    nm_image img = {0};
    ck_assert_int_eq(nm_image_load(&img, NULL, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_image_load(&img, nm_test_path(dir, "missing.png"), NULL), NM_ERR_IO); // err is optional
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_bad_png) {
    nm_test_rng rng = {301};
    char *dir = nm_test_tmpdir();
    int w = 64, h = 64; // random pixels: the IDAT is incompressible, ~12 KiB
    uint8_t *raw = random_bytes(&rng, (size_t)w * h * 3);
    png_spec s = {.w = w, .h = h, .color_type = PNG_COLOR_TYPE_RGB, .depth = 8, .raw = raw};
    const char *good = nm_test_path(dir, "good.png");
    write_png(good, &s);
    size_t len;
    uint8_t *bytes = read_whole(good, &len);
    size_t idat = png_find_chunk(bytes, len, "IDAT");
    ck_assert_uint_gt(idat, 0);
    uint32_t idat_len = get_be32(bytes + idat);
    ck_assert_uint_gt(idat_len, 1000);

    // Cut in the middle of the IDAT.
    const char *cut = nm_test_path(dir, "truncated.png");
    ck_assert_int_eq(nm_test_write_file(cut, bytes, idat + 8 + idat_len / 2), 0);
    load_fails(cut, NM_ERR_FORMAT, "truncated");
    // Cut inside the IHDR.
    ck_assert_int_eq(nm_test_write_file(cut, bytes, 20), 0);
    load_fails(cut, NM_ERR_FORMAT, "truncated");

    // Flipped bytes in the IDAT (the CRC no longer matches, the zlib data is damaged).
    uint8_t *bad = malloc(len);
    ck_assert_ptr_nonnull(bad);
    memcpy(bad, bytes, len);
    for (size_t i = 0; i < 16; i++) bad[idat + 8 + idat_len / 3 + i * 7] ^= 0x5A;
    const char *corrupt = nm_test_path(dir, "corrupt.png");
    ck_assert_int_eq(nm_test_write_file(corrupt, bad, len), 0);
    load_fails(corrupt, NM_ERR_FORMAT, "corrupt PNG data (libpng:");

    // Damaged zlib header with a correct CRC: inflate itself refuses.
    memcpy(bad, bytes, len);
    bad[idat + 8] = 0x00;
    bad[idat + 9] = 0x00;
    put_be32(bad + idat + 8 + idat_len, crc32_png(bad + idat + 4, 4 + (size_t)idat_len));
    ck_assert_int_eq(nm_test_write_file(corrupt, bad, len), 0);
    load_fails(corrupt, NM_ERR_FORMAT, "corrupt PNG data");

    // Hand-made headers: huge, just over the limit, and zero-sized.
    uint8_t hand[128];
    size_t hn = handmade_png(hand, 100000, 100000);
    const char *huge = nm_test_path(dir, "big.png");
    ck_assert_int_eq(nm_test_write_file(huge, hand, hn), 0);
    load_fails(huge, NM_ERR_LIMIT, "100000x100000");
    load_fails(huge, NM_ERR_LIMIT, "over the limit of 67108864 pixels");
    hn = handmade_png(hand, 8193, 8192);
    decode_fails(hand, hn, "just_over.png", NM_ERR_LIMIT, "8193x8192");
    hn = handmade_png(hand, 0, 10);
    const char *zero = nm_test_path(dir, "zero_width.png");
    ck_assert_int_eq(nm_test_write_file(zero, hand, hn), 0);
    load_fails(zero, NM_ERR_FORMAT, "zero-size image");
    hn = handmade_png(hand, 10, 0);
    decode_fails(hand, hn, "zero_height.png", NM_ERR_FORMAT, "zero-size image");
    // A small hand-made header passes the checks; its stub IDAT is too short for 10 rows.
    hn = handmade_png(hand, 10, 10);
    decode_fails(hand, hn, "stub.png", NM_ERR_FORMAT, NULL);

    free(bad);
    free(bytes);
    free(raw);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_bad_jpeg) {
    nm_test_rng rng = {302};
    char *dir = nm_test_tmpdir();
    int w = 48, h = 40;
    uint8_t *pix = smooth_image(&rng, w, h, 3);
    const char *good = nm_test_path(dir, "good.jpg");
    write_jpeg(good, w, h, pix, 3, 95, 0);
    size_t len;
    uint8_t *bytes = read_whole(good, &len);

    // Truncated in the scan data: would decode as half grey; must be an error.
    const char *cut = nm_test_path(dir, "truncated.jpg");
    ck_assert_int_eq(nm_test_write_file(cut, bytes, len / 2), 0);
    load_fails(cut, NM_ERR_FORMAT, "truncated JPEG");
    // Truncated in the header.
    ck_assert_int_eq(nm_test_write_file(cut, bytes, 40), 0);
    load_fails(cut, NM_ERR_FORMAT, NULL);
    decode_fails(bytes, 3, "soi_only.jpg", NM_ERR_FORMAT, NULL);

    // Walk the marker segments to the SOF and to the start of the scan data.
    size_t sof = 0, sos = 0;
    for (size_t pos = 2; pos + 4 <= len && bytes[pos] == 0xFF;) {
        uint8_t m = bytes[pos + 1];
        size_t seg = (size_t)bytes[pos + 2] << 8 | bytes[pos + 3];
        if (m == 0xC0 || m == 0xC2) sof = pos;
        if (m == 0xDA) {
            sos = pos + 2 + seg;
            break;
        }
        pos += 2 + seg;
    }
    ck_assert_uint_gt(sof, 0);
    ck_assert_uint_gt(sos, 0);

    // A marker in the middle of the entropy-coded data: corrupt, not silently grey.
    uint8_t *bad = malloc(len);
    ck_assert_ptr_nonnull(bad);
    memcpy(bad, bytes, len);
    size_t mid = sos + (len - sos) / 3;
    bad[mid] = 0xFF;
    bad[mid + 1] = 0xD9;
    const char *corrupt = nm_test_path(dir, "corrupt.jpg");
    ck_assert_int_eq(nm_test_write_file(corrupt, bad, len), 0);
    load_fails(corrupt, NM_ERR_FORMAT, "corrupt JPEG data");

    // A frame header claiming 60000 x 60000.
    memcpy(bad, bytes, len);
    bad[sof + 5] = 60000 >> 8;
    bad[sof + 6] = 60000 & 0xFF;
    bad[sof + 7] = 60000 >> 8;
    bad[sof + 8] = 60000 & 0xFF;
    const char *huge = nm_test_path(dir, "huge.jpg");
    ck_assert_int_eq(nm_test_write_file(huge, bad, len), 0);
    load_fails(huge, NM_ERR_LIMIT, "60000x60000");

    // 12-bit samples: a valid JPEG that this 8-bit decoder cannot read.
    memcpy(bad, bytes, len);
    bad[sof + 4] = 12;
    decode_fails(bad, len, "twelve_bit.jpg", NM_ERR_UNSUPPORTED, "unsupported JPEG");

    // Width 0 in the frame header.
    memcpy(bad, bytes, len);
    bad[sof + 7] = 0;
    bad[sof + 8] = 0;
    decode_fails(bad, len, "zero.jpg", NM_ERR_FORMAT, "zero-size image");

    free(bad);
    free(bytes);
    free(pix);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Resizing

// Float64 reference of the documented method, written independently of the library: dense
// weight matrices over all input pixels, w = max(0, 1 - |j + 0.5 - (i + 0.5)*scale| / f),
// f = max(scale, 1), each row renormalised; then out = Wy * in * Wx^T, no intermediate rounding.
static double *ref_weights(int n_in, int n_out) {
    double *m = calloc((size_t)n_out * n_in, sizeof *m);
    ck_assert_ptr_nonnull(m);
    double scale = (double)n_in / n_out, f = scale > 1 ? scale : 1;
    for (int i = 0; i < n_out; i++) {
        double c = (i + 0.5) * scale, sum = 0;
        for (int j = 0; j < n_in; j++) {
            double d = fabs(j + 0.5 - c) / f;
            m[(size_t)i * n_in + j] = d < 1 ? 1 - d : 0;
            sum += m[(size_t)i * n_in + j];
        }
        ck_assert(sum > 0);
        for (int j = 0; j < n_in; j++) m[(size_t)i * n_in + j] /= sum;
    }
    return m;
}

static double *ref_resize(const uint8_t *in, int w, int h, int ow, int oh) {
    double *wx = ref_weights(w, ow), *wy = ref_weights(h, oh);
    double *out = calloc((size_t)ow * oh * 3, sizeof *out);
    ck_assert_ptr_nonnull(out);
    for (int y = 0; y < oh; y++)
        for (int x = 0; x < ow; x++)
            for (int j = 0; j < h; j++) {
                double a = wy[(size_t)y * h + j];
                if (a == 0) continue;
                for (int i = 0; i < w; i++) {
                    double b = wx[(size_t)x * w + i];
                    if (b == 0) continue;
                    for (int c = 0; c < 3; c++) out[((size_t)y * ow + x) * 3 + c] += a * b * in[((size_t)j * w + i) * 3 + c];
                }
            }
    free(wx);
    free(wy);
    return out;
}

static nm_image make_image(int w, int h, uint8_t *rgb) { return (nm_image){.width = w, .height = h, .rgb = rgb}; }

START_TEST(test_resize_identity) {
    nm_test_rng rng = {401};
    uint8_t *pix = random_bytes(&rng, 31 * 17 * 3);
    nm_image in = make_image(31, 17, pix), out;
    nm_error err;
    ck_assert_int_eq(nm_image_resize(&out, &in, 31, 17, &err), NM_OK);
    ck_assert_ptr_ne(out.rgb, in.rgb);
    ck_assert_int_eq(memcmp(out.rgb, pix, 31 * 17 * 3), 0);
    nm_image_free(&out);
    free(pix);
}
END_TEST

START_TEST(test_resize_constant) {
    nm_test_rng rng = {402};
    static const int sizes[][4] = {{97, 61, 13, 7}, {13, 7, 97, 61}, {50, 50, 1, 1}, {5, 80, 40, 3}, {1, 1, 9, 4}};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int w = sizes[k][0], h = sizes[k][1], ow = sizes[k][2], oh = sizes[k][3];
        uint8_t colour[3];
        for (int c = 0; c < 3; c++) colour[c] = (uint8_t)(1 + nm_test_rng_next(&rng) % 255);
        uint8_t *pix = malloc((size_t)w * h * 3);
        ck_assert_ptr_nonnull(pix);
        for (size_t i = 0; i < (size_t)w * h; i++) memcpy(pix + 3 * i, colour, 3);
        nm_image in = make_image(w, h, pix), out;
        nm_error err;
        ck_assert_int_eq(nm_image_resize(&out, &in, ow, oh, &err), NM_OK);
        for (size_t i = 0; i < (size_t)ow * oh; i++)
            for (int c = 0; c < 3; c++)
                ck_assert_msg(out.rgb[3 * i + c] == colour[c], "%dx%d -> %dx%d: pixel %zu is %d, want %d", w, h, ow, oh, i,
                              out.rgb[3 * i + c], colour[c]);
        nm_image_free(&out);
        free(pix);
    }
}
END_TEST

START_TEST(test_resize_matches_reference) {
    nm_test_rng rng = {403};
    static const int sizes[][4] = {
        {64, 48, 32, 24},  // 2x box-like downscale
        {100, 75, 37, 29}, // non-integer downscale
        {20, 15, 57, 41},  // upscale
        {30, 40, 45, 13},  // up in x, down in y
        {9, 1, 2, 1},      {1, 1, 3, 2}, {7, 300, 7, 20}, {257, 3, 16, 16},
    };
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int w = sizes[k][0], h = sizes[k][1], ow = sizes[k][2], oh = sizes[k][3];
        uint8_t *pix = random_bytes(&rng, (size_t)w * h * 3);
        nm_image in = make_image(w, h, pix), out;
        nm_error err;
        ck_assert_int_eq(nm_image_resize(&out, &in, ow, oh, &err), NM_OK);
        ck_assert_int_eq(out.width, ow);
        ck_assert_int_eq(out.height, oh);
        double *ref = ref_resize(pix, w, h, ow, oh);
        size_t n = (size_t)ow * oh * 3, exact = 0;
        for (size_t i = 0; i < n; i++) {
            double want = floor(ref[i] + 0.5);
            ck_assert_msg(fabs(out.rgb[i] - want) <= 1, "%dx%d -> %dx%d: value %zu is %d, reference %.3f", w, h, ow, oh, i,
                          out.rgb[i], ref[i]);
            exact += out.rgb[i] == want;
        }
        ck_assert_msg(exact * 100 >= n * 99, "%dx%d -> %dx%d: only %zu of %zu exact", w, h, ow, oh, exact, n);
        free(ref);
        nm_image_free(&out);
        free(pix);
    }
}
END_TEST

// Golden values from Pillow 9.4: Image.resize((ow, oh), Image.BILINEAR) of the pattern
// v(x, y, c) = (37x + 11y + 71c + 5((xy) mod 13)) mod 256.
static const uint8_t pillow_8x6_3x4[] = {47,  118, 182, 138, 163, 125, 121, 68,  119, 70,  139, 152,
                                         149, 140, 85,  64,  95,  159, 94,  147, 155, 179, 76,  96,
                                         83,  100, 171, 114, 177, 112, 166, 129, 104, 69,  120, 191};
static const uint8_t pillow_7x5_3x2[] = {47, 118, 174, 133, 172, 115, 138, 80, 111, 78, 149, 167, 173, 103, 85, 108, 76, 145};
static const uint8_t pillow_5x3_11x7[] = {
    0,   71,  142, 7,   78,  149, 24,  95,  166, 40,  111, 182, 57,  128, 199, 74,  145, 216, 91,  162, 233, 108, 179,
    250, 124, 195, 173, 141, 212, 74,  148, 219, 34,  2,   73,  144, 9,   80,  151, 26,  97,  168, 42,  113, 184, 60,
    131, 202, 77,  148, 219, 94,  165, 220, 112, 183, 220, 128, 199, 154, 145, 216, 72,  152, 223, 38,  6,   77,  148,
    14,  85,  156, 32,  103, 174, 50,  121, 192, 68,  139, 210, 86,  157, 228, 104, 175, 180, 122, 193, 131, 140, 211,
    96,  158, 229, 64,  166, 237, 52,  11,  82,  153, 19,  90,  161, 38,  109, 180, 57,  128, 199, 76,  147, 218, 95,
    166, 237, 114, 185, 140, 133, 204, 42,  152, 223, 38,  171, 242, 57,  179, 250, 65,  16,  87,  158, 24,  95,  166,
    44,  115, 186, 64,  135, 196, 84,  155, 166, 104, 175, 136, 124, 195, 90,  144, 215, 43,  164, 195, 50,  184, 165,
    70,  192, 154, 78,  20,  91,  162, 29,  100, 171, 50,  121, 192, 71,  142, 193, 92,  163, 114, 113, 184, 36,  134,
    205, 40,  155, 226, 45,  176, 167, 62,  197, 89,  83,  206, 57,  92,  22,  93,  164, 31,  102, 173, 52,  123, 194,
    73,  144, 192, 95,  166, 97,  116, 187, 2,   137, 208, 23,  159, 230, 45,  180, 158, 66,  201, 63,  87,  210, 25,
    96};

static void check_pillow(int w, int h, int ow, int oh, const uint8_t *want) {
    uint8_t *pix = malloc((size_t)w * h * 3);
    ck_assert_ptr_nonnull(pix);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++) pix[((size_t)y * w + x) * 3 + c] = (uint8_t)((37 * x + 11 * y + 71 * c + 5 * ((x * y) % 13)) % 256);
    nm_image in = make_image(w, h, pix), out;
    nm_error err;
    ck_assert_int_eq(nm_image_resize(&out, &in, ow, oh, &err), NM_OK);
    for (size_t i = 0; i < (size_t)ow * oh * 3; i++)
        ck_assert_msg(abs((int)out.rgb[i] - want[i]) <= 1, "%dx%d -> %dx%d: value %zu is %d, Pillow %d", w, h, ow, oh, i,
                      out.rgb[i], want[i]);
    nm_image_free(&out);
    free(pix);
}

START_TEST(test_resize_matches_pillow) {
    // Worked by hand: [0 0 255 255] -> 2 pixels, scale 2: output 0 is centred at 1.0 with taps
    // 0, 1, 2 weighted 0.75, 0.75, 0.25 (tap -1 falls outside and is dropped), so
    // 255 * 0.25 / 1.75 = 36.4 -> 36; output 1 likewise 255 * 1.5 / 1.75 = 218.6 -> 219.
    uint8_t row[12] = {0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255};
    nm_image in = make_image(4, 1, row), out;
    nm_error err;
    ck_assert_int_eq(nm_image_resize(&out, &in, 2, 1, &err), NM_OK);
    ck_assert_int_eq(out.rgb[0], 36);
    ck_assert_int_eq(out.rgb[3], 219);
    nm_image_free(&out);
    check_pillow(8, 6, 3, 4, pillow_8x6_3x4);
    check_pillow(7, 5, 3, 2, pillow_7x5_3x2);
    check_pillow(5, 3, 11, 7, pillow_5x3_11x7);
}
END_TEST

START_TEST(test_resize_invalid) {
    uint8_t pix[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    nm_image in = make_image(2, 2, pix), out;
    nm_error err;
    ck_assert_int_eq(nm_image_resize(&out, &in, 0, 5, &err), NM_ERR_INVALID);
    ck_assert_ptr_null(out.rgb);
    ck_assert_int_eq(nm_image_resize(&out, &in, 4, -1, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_image_resize(&out, &in, 10000, 10000, &err), NM_ERR_LIMIT);
    ck_assert_ptr_null(out.rgb);
    nm_image empty = {0};
    ck_assert_int_eq(nm_image_resize(&out, &empty, 4, 4, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_image_resize(NULL, &in, 4, 4, &err), NM_ERR_INVALID);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Normalisation

START_TEST(test_normalize) {
    nm_test_rng rng = {501};
    int s = 5;
    uint8_t *pix = random_bytes(&rng, (size_t)s * s * 3);
    pix[0] = 0;
    pix[1] = 255;
    nm_image img = make_image(s, s, pix);
    float out[3 * 5 * 5];
    nm_image_normalize(out, &img);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < s; y++)
            for (int x = 0; x < s; x++) {
                float want = pix[(y * s + x) * 3 + c] / 127.5f - 1.0f;
                ck_assert_float_eq(out[(c * s + y) * s + x], want);
                ck_assert(out[(c * s + y) * s + x] >= -1.0f && out[(c * s + y) * s + x] <= 1.0f);
            }
    ck_assert_float_eq(out[0], -1.0f);     // channel 0 of pixel (0, 0) was 0
    ck_assert_float_eq(out[s * s], 1.0f);  // channel 1 of pixel (0, 0) was 255
    free(pix);
}
END_TEST

NM_TEST_SUITE(image) {
    Suite *s = suite_create("image");
    TCase *tc = tcase_create("decode");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_png_rgb);
    tcase_add_test(tc, test_png_rgba_over_white);
    tcase_add_test(tc, test_png_grey);
    tcase_add_test(tc, test_png_palette);
    tcase_add_test(tc, test_png_16bit_and_colour_key);
    tcase_add_test(tc, test_jpeg_rgb);
    tcase_add_test(tc, test_jpeg_grey);
    tcase_add_test(tc, test_jpeg_cmyk);
    tcase_add_test(tc, test_format_by_signature);
    suite_add_tcase(s, tc);

    tc = tcase_create("bad_input");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_bad_files);
    tcase_add_test(tc, test_bad_png);
    tcase_add_test(tc, test_bad_jpeg);
    suite_add_tcase(s, tc);

    tc = tcase_create("resize");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_resize_identity);
    tcase_add_test(tc, test_resize_constant);
    tcase_add_test(tc, test_resize_matches_reference);
    tcase_add_test(tc, test_resize_matches_pillow);
    tcase_add_test(tc, test_resize_invalid);
    tcase_add_test(tc, test_normalize);
    suite_add_tcase(s, tc);
    return s;
}
