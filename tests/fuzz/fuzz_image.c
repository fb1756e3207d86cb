// fuzz_image.c — decode + resize + normalise one image from memory.
#include "fuzz_image.h"

#include <stdlib.h>

#include "fuzz_util.h"
#include "nm_image.h"

#define MODEL_IMAGE_SIZE 64

void fuzz_image_one(const uint8_t *data, size_t size) {
    static int limited;
    if (!limited) {
        fuzz_limit("image_pixels=4M"); // 4 Mpx keeps a decode inside libFuzzer's time and RSS budget
        limited = 1;
    }
    nm_image img = {0}, sized = {0};
    nm_error err;
    if (nm_image_decode(&img, data, size, "fuzz-image", &err) == NM_OK) {
        if (img.width <= 0 || img.height <= 0 || !img.rgb) abort();
        if (nm_image_resize(&sized, &img, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, &err) == NM_OK) {
            float *px = malloc((size_t)3 * MODEL_IMAGE_SIZE * MODEL_IMAGE_SIZE * sizeof *px);
            if (px) nm_image_normalize(px, &sized);
            for (int i = 0; px && i < 3 * MODEL_IMAGE_SIZE * MODEL_IMAGE_SIZE; i++)
                if (!(px[i] >= -1.0f && px[i] <= 1.0f)) abort();
            free(px);
        }
    }
    nm_image_free(&img);
    nm_image_free(&sized);
}
