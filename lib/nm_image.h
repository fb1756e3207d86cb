// nm_image.h — image input: PNG/JPEG decoding, resizing, normalisation (DESIGN.md §3).
#ifndef NM_IMAGE_H
#define NM_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "nm_error.h"

// Decoded images larger than nm_limit(NM_LIMIT_IMAGE_PIXELS) pixels (default 64 Mpx = 8192 x 8192)
// are refused before any pixel buffer is allocated (the header is read first); image files
// over nm_limit(NM_LIMIT_IMAGE_FILE_BYTES) are not read (nm_limits.h).

typedef struct {
    int width, height;
    uint8_t *rgb; // (height, width, 3) row-major, 8-bit sRGB; owned
} nm_image;

// Decodes a PNG or JPEG file (detected by its signature, not its name) to 8-bit RGB.
// Grey, palette and 16-bit images are converted; alpha is composited over white.
// Errors name the file: missing, not an image, corrupt, zero-size, too large.
nm_status nm_image_load(nm_image *img, const char *path, nm_error *err);
// Same from memory (used by tests and fuzzers); `name` appears in messages.
nm_status nm_image_decode(nm_image *img, const uint8_t *data, size_t size, const char *name, nm_error *err);
void nm_image_free(nm_image *img);

// Resizes to out_w x out_h with a separable triangle (bilinear) filter whose support widens
// by the scale factor when shrinking (area-aware, as Pillow's Image.resize(BILINEAR)).
// An image already out_w x out_h is copied unchanged.
nm_status nm_image_resize(nm_image *out, const nm_image *in, int out_w, int out_h, nm_error *err);

// pixels: (3, S, S) planar floats, v/127.5 - 1, from an S x S image.
// out must hold 3*S*S floats.
void nm_image_normalize(float *out, const nm_image *img);

// What a model takes from an image file: load, resize to size x size, normalise into a
// malloc'd (3, size, size) array (*out; the caller frees). width/height (may be NULL) get the
// file's own size. On failure *out is NULL.
nm_status nm_image_load_pixels(float **out, const char *path, int size, int *width, int *height, nm_error *err);

#endif
