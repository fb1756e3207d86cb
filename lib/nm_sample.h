// nm_sample.h — one data-set record (nm_data.h) as a model input: the token sequence, the
// image's pixels and the next-token loss targets. Used by the trainer and by `nullmap eval`,
// so both read a record the same way.
//
// Sequence: nm_sequence_build(prompt, with_image) — BOS, [IMG_START, patches, IMG_END,]
// prompt bytes — then the answer part: one space, the answer's bytes, EOS (segment "answer").
// The space keeps "is" + "March" from reading "isMarch"; a model trained this way answers a
// prompt with " March<eos>", and eval compares the generated text without leading spaces.
//
// Targets: position t predicts the token at t + 1. loss_kind[t] says which loss the target
// counts in: NM_LOSS_ANSWER when token t+1 is in the answer part (space, bytes and EOS),
// NM_LOSS_PROMPT when it is a prompt byte, NM_LOSS_NONE otherwise (specials, patches, last).
#ifndef NM_SAMPLE_H
#define NM_SAMPLE_H

#include <stdint.h>

#include "nm_config.h"
#include "nm_data.h"
#include "nm_error.h"
#include "nm_tokenizer.h"

enum { NM_LOSS_NONE = 0, NM_LOSS_PROMPT = 1, NM_LOSS_ANSWER = 2 };

typedef struct {
    nm_sequence seq;     // ids (-1 = patch), patch index, modality, segment; seq.n tokens
    float *pixels;       // (3, S, S) normalised as DESIGN.md §3; NULL for a text-only record
    int32_t *target;     // [seq.n] id of token t+1, -1 at the last position
    uint8_t *loss_kind;  // [seq.n] NM_LOSS_*
    int answer_start;    // index of the answer part's first token (the space)
} nm_sample;

// Builds the sample of record r. Fails with a message naming the record (and the image file)
// when the image cannot be read, the model has no vision for an image record, the text is not
// valid UTF-8, or the sequence would pass the model's max_positions. *s is zeroed on failure.
nm_status nm_sample_build(nm_sample *s, const nm_config *cfg, const nm_data_record *r, nm_error *err);
void nm_sample_free(nm_sample *s); // safe on a zeroed sample

#endif
