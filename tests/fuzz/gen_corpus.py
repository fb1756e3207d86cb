#!/usr/bin/python3
"""Writes the seed corpora of the fuzz harnesses (tests/fuzz/corpus/<harness>/). The outputs are
committed, so CI needs neither Python nor this script; run it again after a format change:
    /usr/bin/python3 tests/fuzz/gen_corpus.py --nullmap build/nullmap
Needs PIL; the models, traces and data set come from the nullmap binary itself."""
import argparse, io, json, os, shutil, struct, subprocess, tempfile
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CONFIG = {  # the config of fuzz_safetensors.c (TINY_CONFIG there)
    "model_type": "nullmap-moe", "format_version": 1, "hidden_size": 8, "num_layers": 1, "num_heads": 1,
    "num_kv_heads": 1, "head_dim": 8, "vocab_size": 261, "max_positions": 64, "tie_embeddings": True,
    "moe": {"num_experts": 2, "null_copies": 2, "top_k": 2, "expert_hidden": 4},
    "tokenizer": {"type": "byte", "bos": 256, "eos": 257}}
VISION_CONFIG = {
    "model_type": "nullmap-moe", "format_version": 1, "hidden_size": 8, "num_layers": 2, "num_heads": 2,
    "num_kv_heads": 1, "head_dim": 4, "vocab_size": 261, "max_positions": 64, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6, "tie_embeddings": False,
    "moe": {"num_experts": 2, "null_copies": 2, "top_k": 2, "expert_hidden": 4, "shared_expert_hidden": 4,
            "null_kind": "copy"},
    "vision": {"image_size": 8, "patch_size": 4, "channels": 3},
    "tokenizer": {"type": "byte", "bos": 256, "eos": 257, "image_start": 258, "image_end": 259, "pad": 260}}


def put(harness, name, data):
    d = os.path.join(HERE, "corpus", harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def pattern(w, h, mode):
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 37) % 256, (y * 53) % 256, ((x + y) * 17) % 256) for y in range(h) for x in range(w)])
    return im.convert(mode) if mode != "RGB" else im


def png(im, **kw):
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


def jpeg(im, **kw):
    b = io.BytesIO()
    im.save(b, "JPEG", **kw)
    return b.getvalue()


def images():
    put("png", "rgb8.png", png(pattern(8, 6, "RGB")))
    put("png", "rgba8.png", png(pattern(5, 7, "RGBA")))
    put("png", "gray8.png", png(pattern(9, 4, "L")))
    put("png", "gray_alpha.png", png(pattern(4, 4, "LA")))
    put("png", "palette.png", png(pattern(8, 8, "P")))
    pal_trns = pattern(6, 6, "P")
    put("png", "palette_trns.png", png(pal_trns, transparency=0))
    put("png", "bilevel.png", png(pattern(13, 3, "1")))
    put("png", "gray16.png", png(pattern(6, 5, "L").convert("I;16")))
    put("png", "interlaced.png", interlaced_png())
    put("png", "one_pixel.png", png(pattern(1, 1, "RGB")))
    put("jpeg", "baseline.jpg", jpeg(pattern(16, 16, "RGB"), quality=50))
    put("jpeg", "progressive.jpg", jpeg(pattern(16, 8, "RGB"), quality=50, progressive=True))
    put("jpeg", "gray.jpg", jpeg(pattern(8, 8, "L"), quality=50))
    put("jpeg", "cmyk.jpg", jpeg(pattern(8, 8, "CMYK"), quality=50))
    put("jpeg", "subsampled_odd.jpg", jpeg(pattern(13, 7, "RGB"), quality=30, subsampling=2))
    put("jpeg", "restart.jpg", jpeg_with_restart())


def interlaced_png():
    # PIL cannot write Adam7; build one by hand: 3x3 RGB, interlaced, each pass filtered None.
    import zlib
    w, h = 3, 3
    px = [[((x * 80) % 256, (y * 90) % 256, 128) for x in range(w)] for y in range(h)]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        xs, ys = list(range(x0, w, dx)), list(range(y0, h, dy))
        if not xs or not ys:
            continue
        for y in ys:
            raw += b"\0" + b"".join(bytes(px[y][x]) for x in xs)

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def jpeg_with_restart():
    # A restart interval (DRI marker) exercises the entropy decoder's resync path.
    data = jpeg(pattern(16, 16, "RGB"), quality=40)
    dri = b"\xff\xdd\x00\x04\x00\x01"
    return data[:2] + dri + data[2:]


def configs():
    put("config", "tiny_text.json", json.dumps(TINY_CONFIG))
    put("config", "vision_copy.json", json.dumps(VISION_CONFIG, indent=1))
    for name in ("random-k8.json", "k8_rho0.5.json"):
        with open(os.path.join(HERE, "..", "..", "samples", "configs", name), "rb") as f:
            put("config", name, f.read())
    bad = dict(TINY_CONFIG, moe=dict(TINY_CONFIG["moe"], top_k=9))
    put("config", "bad_top_k.json", json.dumps(bad))
    put("config", "no_vision_null.json", json.dumps(dict(TINY_CONFIG, vision=None)))
    put("config", "truncated.json", json.dumps(VISION_CONFIG)[:150])


def run(nm, *args, cwd=None):
    subprocess.run([nm, *args], check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def models_and_traces(nm):
    tmp = tempfile.mkdtemp()
    try:
        with open(os.path.join(tmp, "tiny.json"), "w") as f:
            json.dump(TINY_CONFIG, f)
        with open(os.path.join(tmp, "vision.json"), "w") as f:
            json.dump(VISION_CONFIG, f)
        run(nm, "init", "--config", "tiny.json", "--seed", "1", "--out", "tiny", "--dtype", "bf16", cwd=tmp)
        with open(os.path.join(tmp, "tiny", "model.safetensors"), "rb") as f:
            put("safetensors", "tiny-model-bf16.safetensors", f.read())
        run(nm, "init", "--config", "tiny.json", "--seed", "2", "--out", "tiny32", cwd=tmp)
        with open(os.path.join(tmp, "tiny32", "model.safetensors"), "rb") as f:
            put("safetensors", "tiny-model-f32.safetensors", f.read())
        hdr = json.dumps({"__metadata__": {"format": "nullmap-optim", "step": "3"},
                          "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "I64", "shape": [1, 1], "data_offsets": [8, 16]},
                          "c": {"dtype": "F16", "shape": [], "data_offsets": [16, 18]},
                          "d": {"dtype": "BOOL", "shape": [0], "data_offsets": [18, 18]}}).encode()
        put("safetensors", "mixed-dtypes.safetensors",
            struct.pack("<Q", len(hdr)) + hdr + struct.pack("<ffqe", 1.5, -2.0, 7, 0.25))
        run(nm, "init", "--config", "vision.json", "--seed", "3", "--out", "vis", cwd=tmp)
        pattern(8, 8, "RGB").save(os.path.join(tmp, "img.png"))
        with open(os.path.join(tmp, "pairs.tsv"), "w") as f:
            f.write("img.png\tcolour?\n-\tab\\tc\n")
        run(nm, "batch", "--model", "vis", "--pairs", "pairs.tsv", "--out", "two.h5", "--max-new-tokens", "2",
            cwd=tmp)
        with open(os.path.join(tmp, "two.h5"), "rb") as f:
            put("trace", "vision_two_samples.h5", f.read())
        run(nm, "run", "--model", "tiny32", "--prompt", "x", "--max-new-tokens", "1", "--out", "t", "--no-render",
            "--quiet", cwd=tmp)
        with open(os.path.join(tmp, "t", "trace.h5"), "rb") as f:
            put("trace", "text_one_sample.h5", f.read())
        run(nm, "data", "--out", "ds", "--train", "6", "--eval", "1", "--seed", "1", "--image-size", "16", cwd=tmp)
        with open(os.path.join(tmp, "ds", "train.jsonl"), "rb") as f:
            lines = f.read().split(b"\n")
        with open(os.path.join(tmp, "ds", "info.json"), "rb") as f:
            info = f.read()
        put("dataset", "records.jsonl", b"\n".join(lines[:6]) + b"\n")
        put("dataset", "with_info.jsonl", lines[0] + b"\n--- info.json ---\n" + info)
    finally:
        shutil.rmtree(tmp)


def datasets():
    rec = {"id": "train-000001", "split": "train", "image": None, "prompt": "What is 2 + 3?", "answer": "5",
           "task": "text", "family": "arithmetic"}
    put("dataset", "text_only.jsonl", json.dumps(rec) + "\n" + json.dumps(dict(rec, id="train-000002")) + "\r\n")
    obj = dict(rec, image="train/000001.png", task="colour", background="texture",
               objects=[{"kind": "circle", "colour": "red", "bbox": [1, 2, 9, 10]}, {"kind": "word", "bbox": [0, 0, 1, 1]}])
    put("dataset", "objects.jsonl", json.dumps(obj) + "\n")


def prompts():
    put("prompt", "ascii_image", b"\x07What colour is the circle?\x00\x41\x00\x01\x01\x20\x00")
    put("prompt", "utf8_text", "\x06Grüße, 世界 😀 \t\n".encode() + b"\x00\xff\x00\x01\x01")
    put("prompt", "control_chars", b"\x04\x01\x02\x7f\x1b[0m\x00\x80\x00\xc3\x00")
    put("prompt", "bad_utf8", b"\x00\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80")
    put("prompt", "long", b"\x03" + b"abcdefgh" * 40)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nullmap", default="build/nullmap")
    a = ap.parse_args()
    nm = os.path.abspath(a.nullmap)
    images()
    configs()
    datasets()
    prompts()
    models_and_traces(nm)
