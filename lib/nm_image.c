// nm_image.c — image input: PNG/JPEG decoding, resizing, normalisation (DESIGN.md §3).
//
// Decoding policy (what a user gets, documented in the README):
//   * The format is detected from the file's signature (PNG magic, JPEG SOI FF D8 FF), never
//     from its name. GIF, WebP, TIFF and BMP are recognised only to say they are unsupported.
//   * The header is read first: a width or height of 0 is an error, and more than
//     the image_pixels limit (nm_limits.h) is refused (NM_ERR_LIMIT) before any pixel buffer exists.
//   * Output is 8-bit RGB with the sample values as stored. Colour metadata (PNG gAMA/cHRM/
//     sRGB/iCCP, JPEG ICC profiles) is ignored, as Pillow does by default.
//   * PNG: palette and 1/2/4-bit grey are expanded, grey becomes R=G=B, 16-bit samples are
//     scaled to 8 bits with rounding (v*255/65535), and alpha (an alpha channel or a tRNS
//     chunk) is composited over white in 8-bit sRGB values:
//         out = round((c*a + 255*(255 - a)) / 255).
//     Decoding stops after the last image row: chunks after the image data are not read, so a
//     damaged or missing IEND is not an error. Any damage up to the last row is (CRC, zlib).
//   * JPEG: grey and YCbCr become RGB (libjpeg's conversion). CMYK and YCCK are converted
//     naively, without a colour profile, as Pillow's convert("RGB") does:
//         R = (255 - C)(255 - K)/255 (likewise G with M, B with Y), rounded,
//     where Adobe-marked files (Photoshop's convention) store inverted values.
//     Warnings that mean the pixel data is damaged (premature end of file, corrupt entropy
//     data, bad progression) are errors, so a truncated JPEG never decodes to a half-grey
//     picture; harmless warnings (extraneous bytes, unknown JFIF version) are ignored.
//     Progressive files with more than JPEG_MAX_SCANS scans are refused (a known CPU bomb).
//   * Neither library ever prints: their warning handlers record instead, and their error
//     handlers longjmp back here. Files over the image_file_bytes limit are refused.
#include "nm_image.h"

#include "nm_fileutil.h"
#include "nm_limits.h"

#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jpeglib.h> // needs <stdio.h> first
#include <jerror.h>
#include <png.h>

#define JPEG_MAX_SCANS 500

// a * b into *out; 0 on overflow.
static int mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

// The header check shared by both decoders; runs before any pixel buffer is allocated.
static nm_status check_dims(uint64_t w, uint64_t h, const char *name, nm_error *err) {
    if (w == 0 || h == 0)
        return nm_fail(err, NM_ERR_FORMAT, "%s: zero-size image (%" PRIu64 "x%" PRIu64 " pixels)", name, w, h);
    // w, h < 2^32, so w * h cannot overflow 64 bits.
    if (w * h > nm_limit(NM_LIMIT_IMAGE_PIXELS))
        return nm_limit_fail(err, NM_LIMIT_IMAGE_PIXELS, "%s: image is %" PRIu64 "x%" PRIu64 " pixels,", name, w, h);
    return NM_OK;
}

static void image_reset(nm_image *img) {
    img->width = 0;
    img->height = 0;
    img->rgb = NULL;
}

void nm_image_free(nm_image *img) {
    if (!img) return;
    free(img->rgb);
    image_reset(img);
}

// ---------------------------------------------------------------------------------------------
// PNG (libpng, full API so that every conversion above is ours and predictable)

static const uint8_t PNG_SIGNATURE[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

typedef struct {
    const uint8_t *data; // the whole file
    size_t size, pos;
    int truncated;      // the reader ran out of data
    char msg[256];      // libpng's error message
    char warning[256];  // libpng's first warning (recorded, never printed)
    png_structp png;
    png_infop info;
    uint32_t w, h;
    int channels;       // after transforms: 3 (RGB) or 4 (RGBA)
    uint8_t *pix;       // (h, w, channels), owned until handed to the image
    png_bytep *rows;    // (h) pointers into pix
    nm_status status;   // set when png_run stops for a reason of ours (limit, memory)
    const char *name;
    nm_error *err;
} png_ctx;

static void png_on_error(png_structp png, png_const_charp msg) {
    png_ctx *c = png_get_error_ptr(png);
    snprintf(c->msg, sizeof c->msg, "%s", msg ? msg : "unknown error");
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg) {
    png_ctx *c = png_get_error_ptr(png);
    if (!c->warning[0]) snprintf(c->warning, sizeof c->warning, "%s", msg ? msg : "");
}

static void png_on_read(png_structp png, png_bytep out, size_t n) {
    png_ctx *c = png_get_io_ptr(png);
    if (n > c->size - c->pos) {
        c->truncated = 1;
        png_error(png, "unexpected end of file");
    }
    memcpy(out, c->data + c->pos, n);
    c->pos += n;
}

// Everything between setjmp and the end lives in *c (the caller's frame), so nothing this
// function needs after a longjmp is an indeterminate local. Returns 0 on success.
static int png_run(png_ctx *c) {
    if (setjmp(png_jmpbuf(c->png))) return -1;
    png_set_read_fn(c->png, c, png_on_read);
    // Our pixel limit is the only size limit (libpng's default stops at 1,000,000 per side).
    uint64_t side = nm_limit(NM_LIMIT_IMAGE_PIXELS);
    if (side > PNG_UINT_31_MAX) side = PNG_UINT_31_MAX;
    png_set_user_limits(c->png, (png_uint_32)side, (png_uint_32)side);
    png_read_info(c->png, c->info);
    c->w = png_get_image_width(c->png, c->info);
    c->h = png_get_image_height(c->png, c->info);
    c->status = check_dims(c->w, c->h, c->name, c->err);
    if (c->status != NM_OK) return -1;

    int color = png_get_color_type(c->png, c->info);
    int depth = png_get_bit_depth(c->png, c->info);
    if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(c->png);
    if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(c->png);
    if (png_get_valid(c->png, c->info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(c->png);
    if (depth == 16) png_set_scale_16(c->png);
    if (!(color & PNG_COLOR_MASK_COLOR)) png_set_gray_to_rgb(c->png);
    (void)png_set_interlace_handling(c->png);
    png_read_update_info(c->png, c->info);

    c->channels = png_get_channels(c->png, c->info);
    size_t rowbytes = png_get_rowbytes(c->png, c->info);
    if ((c->channels != 3 && c->channels != 4) || png_get_bit_depth(c->png, c->info) != 8 ||
        rowbytes != (size_t)c->w * (size_t)c->channels) {
        c->status = nm_fail(c->err, NM_ERR_INTERNAL, "%s: PNG transforms gave %d channels of %d bits", c->name,
                            c->channels, png_get_bit_depth(c->png, c->info));
        return -1;
    }
    size_t total, rows_bytes;
    if (!mul_size(rowbytes, c->h, &total) || !mul_size(sizeof *c->rows, c->h, &rows_bytes)) {
        c->status = nm_fail(c->err, NM_ERR_LIMIT, "%s: image too large for this machine", c->name);
        return -1;
    }
    c->pix = malloc(total);
    c->rows = malloc(rows_bytes);
    if (!c->pix || !c->rows) {
        c->status = nm_fail(c->err, NM_ERR_NOMEM, "%s: out of memory allocating %zu bytes of pixels", c->name, total);
        return -1;
    }
    for (uint32_t y = 0; y < c->h; y++) c->rows[y] = c->pix + (size_t)y * rowbytes;
    png_read_image(c->png, c->rows);
    return 0;
}

// Composites (n, 4) RGBA over white into (n, 3) RGB, in place (dst index 3i never passes
// the source index 4i, and each pixel is loaded before it is stored).
static void composite_over_white(uint8_t *pix, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const uint8_t *s = pix + 4 * i;
        unsigned r = s[0], g = s[1], b = s[2], a = s[3], bg = 255u * (255u - a);
        uint8_t *d = pix + 3 * i;
        // (x + 127) / 255 rounds x / 255 to nearest (x / 255 is never exactly half-way).
        d[0] = (uint8_t)((r * a + bg + 127u) / 255u);
        d[1] = (uint8_t)((g * a + bg + 127u) / 255u);
        d[2] = (uint8_t)((b * a + bg + 127u) / 255u);
    }
}

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static int is_oom_message(const char *msg) {
    return strncasecmp(msg, "out of memory", 13) == 0 || strncasecmp(msg, "insufficient memory", 19) == 0;
}

static nm_status decode_png(nm_image *img, const uint8_t *data, size_t size, const char *name, nm_error *err) {
    // Our own look at IHDR (it must be the first chunk) for clear messages about zero or huge
    // sizes, before libpng sees them. png_run checks again after libpng has read the header.
    if (size >= 24 && memcmp(data + 12, "IHDR", 4) == 0) {
        nm_status st = check_dims(be32(data + 16), be32(data + 20), name, err);
        if (st != NM_OK) return st;
    }
    png_ctx c;
    memset(&c, 0, sizeof c);
    c.data = data;
    c.size = size;
    c.name = name;
    c.err = err;
    c.status = NM_OK;
    nm_status st = NM_OK;

    c.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &c, png_on_error, png_on_warning);
    if (!c.png) return nm_fail(err, NM_ERR_NOMEM, "%s: out of memory creating the PNG decoder", name);
    c.info = png_create_info_struct(c.png);
    if (!c.info) {
        st = nm_fail(err, NM_ERR_NOMEM, "%s: out of memory creating the PNG decoder", name);
        goto out;
    }
    if (png_run(&c) != 0) {
        if (c.status != NM_OK)
            st = c.status;
        else if (c.truncated)
            st = nm_fail(err, NM_ERR_FORMAT, "%s: truncated PNG file (the data ends before the image is complete)", name);
        else if (is_oom_message(c.msg))
            st = nm_fail(err, NM_ERR_NOMEM, "%s: out of memory decoding PNG (libpng: %s)", name, c.msg);
        else
            st = nm_fail(err, NM_ERR_FORMAT, "%s: corrupt PNG data (libpng: %s)", name, c.msg);
        goto out;
    }
    size_t n = (size_t)c.w * c.h; // <= the image_pixels limit
    if (c.channels == 4) {
        composite_over_white(c.pix, n);
        uint8_t *shrunk = realloc(c.pix, n * 3); // giving back the alpha bytes; failure is harmless
        if (shrunk) c.pix = shrunk;
    }
    img->width = (int)c.w;
    img->height = (int)c.h;
    img->rgb = c.pix;
    c.pix = NULL;
out:
    png_destroy_read_struct(&c.png, c.info ? &c.info : NULL, NULL);
    free(c.rows);
    free(c.pix);
    return st;
}

// ---------------------------------------------------------------------------------------------
// JPEG (libjpeg / libjpeg-turbo)

typedef struct {
    struct jpeg_error_mgr pub; // first: libjpeg hands us a pointer to it
    jmp_buf jmp;
    char msg[JMSG_LENGTH_MAX];     // the message that stopped decoding
    char warning[JMSG_LENGTH_MAX]; // first harmless warning (recorded, never printed)
    int code;                      // libjpeg's message code for msg
    int too_many_scans;
} jpeg_err_mgr;

typedef struct {
    struct jpeg_decompress_struct cinfo;
    jpeg_err_mgr jerr;
    struct jpeg_progress_mgr progress;
    const uint8_t *data;
    size_t size;
    uint32_t w, h;
    int cmyk;       // decoding CMYK/YCCK to CMYK, converted here
    uint8_t *pix;   // (h, w, 3), owned until handed to the image
    uint8_t *row;   // (w, 4) CMYK scanline
    nm_status status; // set when jpeg_run stops for a reason of ours (limit, memory, unsupported)
    const char *name;
    nm_error *err;
} jpeg_ctx;

static void jpeg_on_error(j_common_ptr cinfo) {
    jpeg_err_mgr *e = (jpeg_err_mgr *)cinfo->err;
    e->code = e->pub.msg_code;
    (*e->pub.format_message)(cinfo, e->msg);
    longjmp(e->jmp, 1);
}

static int jpeg_warning_is_fatal(int code) {
    switch (code) {
    case JWRN_JPEG_EOF:          // premature end of file: the rest would be filled with grey
    case JWRN_HIT_MARKER:        // premature end of data segment
    case JWRN_HUFF_BAD_CODE:     // corrupt entropy-coded data
    case JWRN_ARITH_BAD_CODE:
    case JWRN_MUST_RESYNC:       // lost restart-marker sync: rows are missing
    case JWRN_BOGUS_PROGRESSION: // progressive data inconsistent: coefficients are missing
        return 1;
    default:
        return 0;
    }
}

// Trace messages (level >= 0) are dropped; warnings (level -1) are recorded or, when they
// mean damaged pixels, turned into errors.
static void jpeg_on_message(j_common_ptr cinfo, int level) {
    jpeg_err_mgr *e = (jpeg_err_mgr *)cinfo->err;
    if (level >= 0) return;
    e->pub.num_warnings++;
    if (jpeg_warning_is_fatal(e->pub.msg_code)) {
        e->code = e->pub.msg_code;
        (*e->pub.format_message)(cinfo, e->msg);
        longjmp(e->jmp, 1);
    }
    if (!e->warning[0]) (*e->pub.format_message)(cinfo, e->warning);
}

static void jpeg_on_output(j_common_ptr cinfo) { (void)cinfo; } // never print

static void jpeg_on_progress(j_common_ptr cinfo) {
    if (!cinfo->is_decompressor) return;
    jpeg_err_mgr *e = (jpeg_err_mgr *)cinfo->err;
    if (((j_decompress_ptr)cinfo)->input_scan_number > JPEG_MAX_SCANS) {
        e->too_many_scans = 1;
        longjmp(e->jmp, 1);
    }
}

// (w) CMYK pixels to RGB; see the policy at the top of the file.
static void cmyk_to_rgb(uint8_t *rgb, const uint8_t *cmyk, size_t w, int inverted) {
    for (size_t x = 0; x < w; x++) {
        const uint8_t *s = cmyk + 4 * x;
        unsigned k = inverted ? s[3] : 255u - s[3];
        for (int i = 0; i < 3; i++) {
            unsigned v = inverted ? s[i] : 255u - s[i];
            rgb[3 * x + i] = (uint8_t)((v * k + 127u) / 255u);
        }
    }
}

// As png_run: everything that outlives a longjmp is in *c. Returns 0 on success.
static int jpeg_run(jpeg_ctx *c) {
    j_decompress_ptr ci = &c->cinfo;
    ci->err = jpeg_std_error(&c->jerr.pub);
    c->jerr.pub.error_exit = jpeg_on_error;
    c->jerr.pub.emit_message = jpeg_on_message;
    c->jerr.pub.output_message = jpeg_on_output;
    if (setjmp(c->jerr.jmp)) return -1;
    jpeg_create_decompress(ci); // keeps ci->err
    c->progress.progress_monitor = jpeg_on_progress;
    ci->progress = &c->progress;
    jpeg_mem_src(ci, c->data, (unsigned long)c->size);
    (void)jpeg_read_header(ci, TRUE); // TRUE: a tables-only stream is an error
    c->w = ci->image_width;
    c->h = ci->image_height;
    c->status = check_dims(c->w, c->h, c->name, c->err);
    if (c->status != NM_OK) return -1;

    switch (ci->jpeg_color_space) {
    case JCS_GRAYSCALE:
    case JCS_YCbCr:
    case JCS_RGB: ci->out_color_space = JCS_RGB; break;
    case JCS_CMYK:
    case JCS_YCCK:
        ci->out_color_space = JCS_CMYK;
        c->cmyk = 1;
        break;
    default:
        c->status = nm_fail(c->err, NM_ERR_UNSUPPORTED, "%s: unsupported JPEG colour space (%d components)", c->name,
                            ci->num_components);
        return -1;
    }
    (void)jpeg_start_decompress(ci);
    int want = c->cmyk ? 4 : 3;
    if (ci->output_width != c->w || ci->output_height != c->h || ci->output_components != want) {
        c->status = nm_fail(c->err, NM_ERR_INTERNAL, "%s: libjpeg output is %ux%ux%d, expected %" PRIu32 "x%" PRIu32 "x%d",
                            c->name, (unsigned)ci->output_width, (unsigned)ci->output_height, ci->output_components,
                            c->w, c->h, want);
        return -1;
    }
    size_t stride = (size_t)c->w * 3, total;
    if (!mul_size(stride, c->h, &total)) {
        c->status = nm_fail(c->err, NM_ERR_LIMIT, "%s: image too large for this machine", c->name);
        return -1;
    }
    c->pix = malloc(total);
    if (c->cmyk) c->row = malloc((size_t)c->w * 4);
    if (!c->pix || (c->cmyk && !c->row)) {
        c->status = nm_fail(c->err, NM_ERR_NOMEM, "%s: out of memory allocating %zu bytes of pixels", c->name, total);
        return -1;
    }
    while (ci->output_scanline < ci->output_height) {
        size_t y = ci->output_scanline;
        JSAMPROW dst = c->cmyk ? c->row : c->pix + y * stride;
        if (jpeg_read_scanlines(ci, &dst, 1) != 1) { // cannot happen with a memory source
            c->status = nm_fail(c->err, NM_ERR_FORMAT, "%s: truncated JPEG file", c->name);
            return -1;
        }
        if (c->cmyk) cmyk_to_rgb(c->pix + y * stride, c->row, c->w, ci->saw_Adobe_marker);
    }
    (void)jpeg_finish_decompress(ci);
    return 0;
}

static nm_status decode_jpeg(nm_image *img, const uint8_t *data, size_t size, const char *name, nm_error *err) {
    jpeg_ctx c;
    memset(&c, 0, sizeof c); // also makes jpeg_destroy_decompress safe if create never ran
    c.data = data;
    c.size = size;
    c.name = name;
    c.err = err;
    c.status = NM_OK;
    nm_status st = NM_OK;
    if (jpeg_run(&c) != 0) {
        if (c.status != NM_OK)
            st = c.status;
        else if (c.jerr.too_many_scans)
            st = nm_fail(err, NM_ERR_LIMIT, "%s: progressive JPEG has more than %d scans", name, JPEG_MAX_SCANS);
        else if (c.jerr.code == JERR_OUT_OF_MEMORY)
            st = nm_fail(err, NM_ERR_NOMEM, "%s: out of memory decoding JPEG (libjpeg: %s)", name, c.jerr.msg);
        else if (c.jerr.code == JERR_BAD_PRECISION || c.jerr.code == JERR_CONVERSION_NOTIMPL ||
                 c.jerr.code == JERR_NOT_COMPILED) // e.g. 12-bit samples: well-formed, not decodable here
            st = nm_fail(err, NM_ERR_UNSUPPORTED, "%s: unsupported JPEG (libjpeg: %s)", name, c.jerr.msg);
        else if (c.jerr.code == JERR_EMPTY_IMAGE) // libjpeg checks this inside jpeg_read_header
            st = nm_fail(err, NM_ERR_FORMAT, "%s: zero-size image (libjpeg: %s)", name, c.jerr.msg);
        else if (c.jerr.code == JWRN_JPEG_EOF)
            st = nm_fail(err, NM_ERR_FORMAT, "%s: truncated JPEG file (libjpeg: %s)", name, c.jerr.msg);
        else
            st = nm_fail(err, NM_ERR_FORMAT, "%s: corrupt JPEG data (libjpeg: %s)", name, c.jerr.msg);
        goto out;
    }
    img->width = (int)c.w;
    img->height = (int)c.h;
    img->rgb = c.pix;
    c.pix = NULL;
out:
    jpeg_destroy_decompress(&c.cinfo);
    free(c.row);
    free(c.pix);
    return st;
}

// ---------------------------------------------------------------------------------------------
// Entry points

// Names a few formats we recognise but do not decode, for a better message; NULL otherwise.
static const char *other_format(const uint8_t *d, size_t n) {
    if (n >= 6 && (memcmp(d, "GIF87a", 6) == 0 || memcmp(d, "GIF89a", 6) == 0)) return "GIF";
    if (n >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0) return "WebP";
    if (n >= 4 && (memcmp(d, "II*\0", 4) == 0 || memcmp(d, "MM\0*", 4) == 0)) return "TIFF";
    if (n >= 14 && d[0] == 'B' && d[1] == 'M' && d[6] == 0 && d[7] == 0 && d[8] == 0 && d[9] == 0) return "BMP";
    return NULL;
}

nm_status nm_image_decode(nm_image *img, const uint8_t *data, size_t size, const char *name, nm_error *err) {
    if (!name) name = "<memory>";
    if (!img) return nm_fail(err, NM_ERR_INVALID, "%s: no image to decode into", name);
    image_reset(img);
    if (!data && size > 0) return nm_fail(err, NM_ERR_INVALID, "%s: no data", name);
    if (size == 0) return nm_fail(err, NM_ERR_FORMAT, "%s: empty file", name);
    if (size >= sizeof PNG_SIGNATURE && memcmp(data, PNG_SIGNATURE, sizeof PNG_SIGNATURE) == 0)
        return decode_png(img, data, size, name, err);
    if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return decode_jpeg(img, data, size, name, err);
    const char *other = other_format(data, size);
    if (other) return nm_fail(err, NM_ERR_UNSUPPORTED, "%s: %s images are not supported (use PNG or JPEG)", name, other);
    return nm_fail(err, NM_ERR_FORMAT, "%s: not a PNG or JPEG file", name);
}

nm_status nm_image_load(nm_image *img, const char *path, nm_error *err) {
    if (!img) return nm_fail(err, NM_ERR_INVALID, "%s: no image to load into", path ? path : "(null)");
    image_reset(img);
    if (!path) return nm_fail(err, NM_ERR_INVALID, "image path is NULL");
    char *data;
    size_t size;
    nm_status st = nm_read_file(path, (size_t)nm_limit(NM_LIMIT_IMAGE_FILE_BYTES), &data, &size, err);
    if (st != NM_OK) return st;
    st = nm_image_decode(img, (const uint8_t *)data, size, path, err);
    free(data);
    return st;
}

// ---------------------------------------------------------------------------------------------
// Resizing
//
// Method (documented to users): separable resampling with a triangle (bilinear) filter that
// is stretched when shrinking, i.e. Pillow's Image.resize(size, Image.BILINEAR).
// Along an axis of n_in input pixels resized to n_out, scale = n_in / n_out, and output pixel
// i is centred at input coordinate c = (i + 0.5) * scale (input pixel j covers [j, j + 1)).
// Its value is the weighted mean of the input pixels near c with weights
//     w_j = max(0, 1 - |j + 0.5 - c| / f),   f = max(scale, 1),
// so enlarging (f = 1) is ordinary bilinear interpolation between the two nearest pixel
// centres, and shrinking by s averages over a triangle 2s pixels wide, so that every input
// pixel contributes (antialiased; no pixels skipped). At the borders, filter taps that fall
// outside the image are dropped and the remaining weights renormalised to sum to 1 (Pillow's
// edge handling; for enlarging this equals clamping to the edge pixel). Rows and columns are
// resampled one after the other, in whichever order needs the smaller intermediate image,
// which is kept in float; the result is rounded to nearest and clamped to 0..255. Results
// agree with Pillow to within one level (Pillow rounds to 8 bits between the two passes and
// uses fixed-point weights). An image that already has the requested size is copied exactly.

typedef struct {
    int *start; // (n_out) first input pixel of each output pixel's window
    int *count; // (n_out) window length
    float *w;   // (n_out, kmax) normalised weights
    int kmax;
} taps;

static void taps_free(taps *t) {
    free(t->start);
    free(t->count);
    free(t->w);
}

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

static nm_status taps_init(taps *t, int n_in, int n_out, nm_error *err) {
    memset(t, 0, sizeof *t);
    double scale = (double)n_in / n_out;
    double f = scale > 1.0 ? scale : 1.0; // filter stretch
    double support = 1.0 * f;            // triangle radius 1, stretched
    t->kmax = (int)ceil(support) * 2 + 1; // <= 2 * n_in + 1, so fits an int
    size_t nw;
    if (!mul_size((size_t)n_out, (size_t)t->kmax, &nw) || !mul_size(nw, sizeof *t->w, &nw))
        return nm_fail(err, NM_ERR_LIMIT, "resize: filter table for %d -> %d pixels too large", n_in, n_out);
    t->start = malloc((size_t)n_out * sizeof *t->start);
    t->count = malloc((size_t)n_out * sizeof *t->count);
    t->w = malloc(nw);
    if (!t->start || !t->count || !t->w) {
        taps_free(t);
        return nm_fail(err, NM_ERR_NOMEM, "resize: out of memory allocating filter tables (%zu bytes)", nw);
    }
    for (int i = 0; i < n_out; i++) {
        double c = (i + 0.5) * scale;
        int lo = (int)(c - support + 0.5); // truncation then clamping, exactly as Pillow
        if (lo < 0) lo = 0;
        int hi = (int)(c + support + 0.5);
        if (hi > n_in) hi = n_in;
        double sum = 0.0;
        for (int j = lo; j < hi; j++) sum += triangle((j + 0.5 - c) / f);
        // The pixel containing c is always in the window with weight >= 1/2.
        if (!(sum > 0.0)) {
            taps_free(t);
            return nm_fail(err, NM_ERR_INTERNAL, "resize: empty filter window (%d -> %d, pixel %d)", n_in, n_out, i);
        }
        float *k = t->w + (size_t)i * t->kmax;
        for (int j = lo; j < hi; j++) k[j - lo] = (float)(triangle((j + 0.5 - c) / f) / sum);
        t->start[i] = lo;
        t->count[i] = hi - lo;
    }
    return NM_OK;
}

// One pass reads 8-bit pixels (the input image) or floats (the intermediate) and writes
// floats (the intermediate) or 8-bit pixels (the output).
static inline float px_load(const void *p, size_t i, int u8) {
    return u8 ? (float)((const uint8_t *)p)[i] : ((const float *)p)[i];
}

static inline void px_store(void *p, size_t i, float v, int u8) {
    if (!u8) {
        ((float *)p)[i] = v;
        return;
    }
    v = v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v;
    ((uint8_t *)p)[i] = (uint8_t)(v + 0.5f);
}

// Resamples each of `rows` rows from w_in to t's n_out pixels: in (rows, w_in, 3) -> out (rows, w_out, 3).
static void resample_rows(void *out, int out_u8, const void *in, int in_u8, size_t rows, size_t w_in, size_t w_out,
                          const taps *t) {
    for (size_t y = 0; y < rows; y++) {
        size_t in_row = y * w_in * 3, out_row = y * w_out * 3;
        for (size_t x = 0; x < w_out; x++) {
            const float *k = t->w + x * (size_t)t->kmax;
            size_t s = in_row + (size_t)t->start[x] * 3;
            float r = 0.0f, g = 0.0f, b = 0.0f;
            for (int j = 0; j < t->count[x]; j++, s += 3) {
                r += k[j] * px_load(in, s, in_u8);
                g += k[j] * px_load(in, s + 1, in_u8);
                b += k[j] * px_load(in, s + 2, in_u8);
            }
            px_store(out, out_row + x * 3, r, out_u8);
            px_store(out, out_row + x * 3 + 1, g, out_u8);
            px_store(out, out_row + x * 3 + 2, b, out_u8);
        }
    }
}

// Resamples columns to t's n_out rows: in (h_in, w, 3) -> out (h_out, w, 3). acc holds w*3 floats.
static void resample_cols(void *out, int out_u8, const void *in, int in_u8, size_t w, size_t h_out, const taps *t,
                          float *acc) {
    size_t line = w * 3;
    for (size_t y = 0; y < h_out; y++) {
        const float *k = t->w + y * (size_t)t->kmax;
        memset(acc, 0, line * sizeof *acc);
        for (int j = 0; j < t->count[y]; j++) {
            size_t src = (size_t)(t->start[y] + j) * line;
            float kj = k[j];
            for (size_t i = 0; i < line; i++) acc[i] += kj * px_load(in, src + i, in_u8);
        }
        for (size_t i = 0; i < line; i++) px_store(out, y * line + i, acc[i], out_u8);
    }
}

nm_status nm_image_resize(nm_image *out, const nm_image *in, int out_w, int out_h, nm_error *err) {
    if (!out) return nm_fail(err, NM_ERR_INVALID, "resize: no output image");
    image_reset(out);
    if (!in || !in->rgb || in->width <= 0 || in->height <= 0)
        return nm_fail(err, NM_ERR_INVALID, "resize: the input image is empty");
    if ((uint64_t)in->width * (uint64_t)in->height > nm_limit(NM_LIMIT_IMAGE_PIXELS))
        return nm_limit_fail(err, NM_LIMIT_IMAGE_PIXELS, "resize: input %dx%d is", in->width, in->height);
    if (out_w <= 0 || out_h <= 0)
        return nm_fail(err, NM_ERR_INVALID, "resize: cannot resize to %dx%d (sizes must be positive)", out_w, out_h);
    if ((uint64_t)out_w * (uint64_t)out_h > nm_limit(NM_LIMIT_IMAGE_PIXELS))
        return nm_limit_fail(err, NM_LIMIT_IMAGE_PIXELS, "resize: output %dx%d is", out_w, out_h);

    size_t w_in = (size_t)in->width, h_in = (size_t)in->height, w_out = (size_t)out_w, h_out = (size_t)out_h;
    size_t out_bytes = w_out * h_out * 3; // <= 3 * the image_pixels limit
    uint8_t *pix = malloc(out_bytes);
    if (!pix) return nm_fail(err, NM_ERR_NOMEM, "resize: out of memory allocating %zu bytes", out_bytes);
    if (w_out == w_in && h_out == h_in) {
        memcpy(pix, in->rgb, out_bytes);
        out->width = out_w;
        out->height = out_h;
        out->rgb = pix;
        return NM_OK;
    }

    nm_status st = NM_OK;
    taps tx, ty;
    memset(&tx, 0, sizeof tx);
    memset(&ty, 0, sizeof ty);
    float *tmp = NULL, *acc = NULL;
    // Rows first gives a (h_in, w_out) intermediate, columns first (h_out, w_in): take the smaller.
    int rows_first = (uint64_t)w_out * h_in <= (uint64_t)w_in * h_out; // each side < 2^52
    size_t tmp_px = rows_first ? w_out * h_in : w_in * h_out, tmp_bytes;
    size_t acc_w = rows_first ? w_out : w_in;
    if (!mul_size(tmp_px, 3 * sizeof *tmp, &tmp_bytes)) {
        st = nm_fail(err, NM_ERR_LIMIT, "resize: %dx%d -> %dx%d needs too much memory", in->width, in->height, out_w, out_h);
        goto fail;
    }
    if ((st = taps_init(&tx, in->width, out_w, err)) != NM_OK) goto fail;
    if ((st = taps_init(&ty, in->height, out_h, err)) != NM_OK) goto fail;
    tmp = malloc(tmp_bytes);
    acc = malloc(acc_w * 3 * sizeof *acc);
    if (!tmp || !acc) {
        st = nm_fail(err, NM_ERR_NOMEM, "resize: out of memory allocating %zu bytes", tmp_bytes);
        goto fail;
    }
    if (rows_first) {
        resample_rows(tmp, 0, in->rgb, 1, h_in, w_in, w_out, &tx);
        resample_cols(pix, 1, tmp, 0, w_out, h_out, &ty, acc);
    } else {
        resample_cols(tmp, 0, in->rgb, 1, w_in, h_out, &ty, acc);
        resample_rows(pix, 1, tmp, 0, h_out, w_in, w_out, &tx);
    }
fail:
    taps_free(&tx);
    taps_free(&ty);
    free(tmp);
    free(acc);
    if (st != NM_OK) {
        free(pix);
        return st;
    }
    out->width = out_w;
    out->height = out_h;
    out->rgb = pix;
    return NM_OK;
}

// ---------------------------------------------------------------------------------------------
// Normalisation

void nm_image_normalize(float *out, const nm_image *img) {
    // (H, W, 3) interleaved bytes -> (3, H, W) planar floats in [-1, 1]; the model wants S x S,
    // but nothing here depends on the image being square.
    size_t w = (size_t)img->width, h = (size_t)img->height, plane = w * h;
    for (size_t i = 0; i < plane; i++)
        for (size_t c = 0; c < 3; c++) out[c * plane + i] = (float)img->rgb[i * 3 + c] / 127.5f - 1.0f;
}

nm_status nm_image_load_pixels(float **out, const char *path, int size, int *width, int *height, nm_error *err) {
    nm_image img = {0}, sized = {0};
    *out = NULL;
    nm_status s = nm_image_load(&img, path, err);
    if (s == NM_OK) s = nm_image_resize(&sized, &img, size, size, err);
    if (s == NM_OK) {
        *out = malloc((size_t)3 * size * size * sizeof(float));
        if (*out) nm_image_normalize(*out, &sized);
        else s = NM_NOMEM(err, "pixels");
    }
    if (s == NM_OK && width) *width = img.width;
    if (s == NM_OK && height) *height = img.height;
    nm_image_free(&img);
    nm_image_free(&sized);
    return s;
}
