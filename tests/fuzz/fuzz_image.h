// fuzz_image.h — the image path shared by the PNG and JPEG harnesses: decode, resize to the
// shipped model's image size (64 x 64) and normalise, as nm_image_load_pixels does.
#ifndef NM_FUZZ_IMAGE_H
#define NM_FUZZ_IMAGE_H

#include <stddef.h>
#include <stdint.h>

void fuzz_image_one(const uint8_t *data, size_t size);

#endif
