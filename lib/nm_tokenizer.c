// nm_tokenizer.c — byte tokenizer, sequence layout, token display text.
#include "nm_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_trace.h"

// Length of the UTF-8 character starting at s[i] (1..4), or 0 if it is not valid there.
static int utf8_char_len(const unsigned char *s, size_t n, size_t i) {
    unsigned c = s[i];
    if (c < 0x80) return 1;
    int len;
    unsigned min;
    if (c >= 0xc2 && c <= 0xdf) len = 2, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef) len = 3, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4) len = 4, min = 0x10000;
    else return 0;
    if (i + (size_t)len > n) return 0;
    unsigned cp = c & (0x3f >> (len - 1));
    for (int k = 1; k < len; k++) {
        unsigned d = s[i + k];
        if ((d & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (d & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

int nm_utf8_valid(const char *s, size_t n, size_t *bad) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        int l = utf8_char_len(u, n, i);
        if (l == 0) {
            if (bad) *bad = i;
            return 0;
        }
        i += (size_t)l;
    }
    return 1;
}

void nm_sequence_free(nm_sequence *seq) {
    if (!seq) return;
    free(seq->id);
    free(seq->patch);
    free(seq->modality);
    free(seq->segment);
    memset(seq, 0, sizeof *seq);
}

static void put(nm_sequence *seq, int32_t id, int32_t patch, int mod, int segm) {
    int i = seq->n++;
    seq->id[i] = id;
    seq->patch[i] = patch;
    seq->modality[i] = (uint8_t)mod;
    seq->segment[i] = (uint8_t)segm;
}

nm_status nm_sequence_build(nm_sequence *seq, const nm_config *cfg, const char *prompt, int with_image, int extra,
                            nm_error *err) {
    memset(seq, 0, sizeof *seq);
    size_t plen = strlen(prompt), bad = 0;
    if (!nm_utf8_valid(prompt, plen, &bad))
        return nm_fail(err, NM_ERR_INVALID, "prompt is not valid UTF-8 (bad byte 0x%02x at offset %zu)",
                       (unsigned char)prompt[bad], bad);
    if (with_image && !cfg->has_vision)
        return nm_fail(err, NM_ERR_INVALID, "an image was given but the model is text-only (no \"vision\" in its config)");
    long long np = with_image ? nm_config_num_patches(cfg) : 0;
    long long n = 1 + (with_image ? np + 2 : 0) + (long long)plen;
    if (n > cfg->max_positions)
        return nm_fail(err, NM_ERR_LIMIT, "prompt needs %lld tokens but the model's max_positions is %d", n,
                       cfg->max_positions);
    if (extra < 0) extra = 0;
    long long cap = n + extra;
    if (cap > cfg->max_positions) cap = cfg->max_positions;
    seq->cap = (int)cap;
    seq->id = malloc((size_t)cap * sizeof *seq->id);
    seq->patch = malloc((size_t)cap * sizeof *seq->patch);
    seq->modality = malloc((size_t)cap);
    seq->segment = malloc((size_t)cap);
    if (!seq->id || !seq->patch || !seq->modality || !seq->segment) {
        nm_sequence_free(seq);
        return NM_NOMEM(err, "token sequence");
    }
    put(seq, cfg->tok.bos, -1, NM_MOD_SPECIAL, NM_SEG_BOS);
    if (with_image) {
        put(seq, cfg->tok.image_start, -1, NM_MOD_SPECIAL, NM_SEG_IMAGE);
        for (int p = 0; p < np; p++) put(seq, -1, p, NM_MOD_VISION, NM_SEG_IMAGE);
        put(seq, cfg->tok.image_end, -1, NM_MOD_SPECIAL, NM_SEG_IMAGE);
    }
    for (size_t i = 0; i < plen; i++) put(seq, (unsigned char)prompt[i], -1, NM_MOD_TEXT, NM_SEG_PROMPT);
    return NM_OK;
}

nm_status nm_sequence_push(nm_sequence *seq, const nm_config *cfg, int32_t id, nm_error *err) {
    if (seq->n >= seq->cap) return nm_fail(err, NM_ERR_LIMIT, "sequence is full (%d tokens)", seq->cap);
    int mod = id < 256 ? NM_MOD_TEXT : NM_MOD_SPECIAL;
    put(seq, id, -1, mod, NM_SEG_ANSWER);
    (void)cfg;
    return NM_OK;
}

static char *dup_str(const char *s) {
    char *p = strdup(s);
    return p;
}

char *nm_token_display(const nm_config *cfg, const nm_sequence *seq, int i) {
    int32_t id = seq->id[i];
    char buf[64];
    if (id < 0) {
        int g = nm_config_grid(cfg), p = seq->patch[i];
        snprintf(buf, sizeof buf, "<patch %d,%d>", g ? p / g : 0, g ? p % g : 0);
        return dup_str(buf);
    }
    if (id >= 256) {
        const nm_tokenizer_config *t = &cfg->tok;
        if (id == t->bos) return dup_str("<bos>");
        if (id == t->eos) return dup_str("<eos>");
        if (id == t->image_start) return dup_str("<img>");
        if (id == t->image_end) return dup_str("</img>");
        if (id == t->pad) return dup_str("<pad>");
        snprintf(buf, sizeof buf, "<id %d>", id);
        return dup_str(buf);
    }
    unsigned c = (unsigned)id;
    if (c < 0x20 || c == 0x7f) { // control picture: U+2400 + c, U+2421 for DEL
        unsigned cp = c == 0x7f ? 0x2421 : 0x2400 + c;
        buf[0] = (char)(0xe0 | (cp >> 12));
        buf[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        buf[2] = (char)(0x80 | (cp & 0x3f));
        buf[3] = '\0';
        return dup_str(buf);
    }
    if (c < 0x80) {
        buf[0] = (char)c;
        buf[1] = '\0';
        return dup_str(buf);
    }
    // Multi-byte: gather the run of byte tokens around i and decode the character there.
    unsigned char bytes[4];
    if ((c & 0xc0) == 0x80) { // continuation: empty if it belongs to a valid character before it
        for (int back = 1; back <= 3 && i - back >= 0; back++) {
            int32_t b = seq->id[i - back];
            if (b < 0 || b >= 256) break;
            if ((b & 0xc0) != 0x80) {
                int n = 0;
                for (int k = i - back; k < seq->n && k < i - back + 4 && seq->id[k] >= 0 && seq->id[k] < 256; k++)
                    bytes[n++] = (unsigned char)seq->id[k];
                int l = utf8_char_len(bytes, (size_t)n, 0);
                if (l > back) return dup_str("");
                break;
            }
        }
    } else {
        int n = 0;
        for (int k = i; k < seq->n && k < i + 4 && seq->id[k] >= 0 && seq->id[k] < 256; k++) bytes[n++] = (unsigned char)seq->id[k];
        int l = utf8_char_len(bytes, (size_t)n, 0);
        if (l > 0) {
            memcpy(buf, bytes, (size_t)l);
            buf[l] = '\0';
            return dup_str(buf);
        }
    }
    snprintf(buf, sizeof buf, "\\x%02x", c);
    return dup_str(buf);
}

char *nm_sequence_answer(const nm_config *cfg, const nm_sequence *seq) {
    // Answer bytes (EOS and other specials excluded) as valid UTF-8: a byte that does not
    // start a valid character becomes U+FFFD, so every reader can decode the text. The exact
    // bytes stay in the token ids.
    unsigned char *bytes = malloc((size_t)seq->n + 1);
    char *s = malloc(3 * (size_t)seq->n + 1);
    if (!bytes || !s) {
        free(bytes);
        free(s);
        return NULL;
    }
    size_t nb = 0, n = 0;
    for (int i = 0; i < seq->n; i++)
        if (seq->segment[i] == NM_SEG_ANSWER && seq->id[i] >= 0 && seq->id[i] < 256) bytes[nb++] = (unsigned char)seq->id[i];
    for (size_t i = 0; i < nb;) {
        int l = bytes[i] == 0 ? 0 : utf8_char_len(bytes, nb, i); // a NUL would end the C string
        if (l > 0) {
            memcpy(s + n, bytes + i, (size_t)l);
            n += (size_t)l;
            i += (size_t)l;
        } else {
            memcpy(s + n, "\xef\xbf\xbd", 3);
            n += 3;
            i++;
        }
    }
    s[n] = '\0';
    free(bytes);
    (void)cfg;
    return s;
}
