// nm_tokenizer.h — the byte tokenizer and the sequence layout (DESIGN.md §3):
//   with an image:  BOS, IMG_START, patches row-major, IMG_END, prompt bytes, answer…
//   text only:      BOS, prompt bytes, answer…
// Special ids come from the config, never from constants.
#ifndef NM_TOKENIZER_H
#define NM_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "nm_config.h"
#include "nm_error.h"

typedef struct {
    int n, cap;
    int32_t *id;       // [cap] byte or special id; -1 for an image patch
    int32_t *patch;    // [cap] patch index (row-major in the grid), -1 otherwise
    uint8_t *modality; // [cap] NM_MOD_* (nm_trace.h)
    uint8_t *segment;  // [cap] NM_SEG_*
} nm_sequence;

// Returns 1 if s[0..n) is valid UTF-8 (no overlongs, surrogates or code points > U+10FFFF);
// otherwise 0 and *bad = offset of the first bad byte.
int nm_utf8_valid(const char *s, size_t n, size_t *bad);

// Builds the prompt part of a sequence, with room for `extra` more tokens (the answer).
// The prompt must be valid UTF-8. with_image needs a vision model.
nm_status nm_sequence_build(nm_sequence *seq, const nm_config *cfg, const char *prompt, int with_image, int extra,
                            nm_error *err);
// Appends a generated token (segment "answer"). Fails only when the capacity is exhausted.
nm_status nm_sequence_push(nm_sequence *seq, const nm_config *cfg, int32_t id, nm_error *err);
void nm_sequence_free(nm_sequence *seq);

// How token i is shown to a person (malloc'd UTF-8): a byte that starts a valid UTF-8
// character shows the whole character, its continuation bytes show "" (the character is
// on the lead byte); control characters show as Unicode control pictures (␊ for \n);
// stray invalid bytes show as "\xNN"; specials as <bos>, <eos>, <img>, </img>, <pad>;
// patches as "<patch r,c>"; other ids as "<id N>".
char *nm_token_display(const nm_config *cfg, const nm_sequence *seq, int i);

// The generated answer as valid UTF-8 text (answer-segment bytes, specials excluded; a byte
// that starts no valid character, or a NUL, becomes U+FFFD). malloc'd.
char *nm_sequence_answer(const nm_config *cfg, const nm_sequence *seq);

#endif
