// fuzz_jpeg.c — JPEG decoding (libjpeg through nm_image_decode), resizing, normalisation.
#include <stddef.h>
#include <stdint.h>

#include "fuzz_image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_image_one(data, size);
    return 0;
}
