#!/usr/bin/python3
"""trace_check.py — reads nullmap traces back with h5py (the crash and concurrent-reader tests).

  trace_check.py intact TRACE [NAME ...]   every sample reads back whole and passes the schema's
                                           invariants; every NAME (e.g. 000012) is present.
                                           Prints the number of samples.
  trace_check.py prefix TRACE REF          TRACE's samples are the first n of REF, same values
                                           (a reader's view of a batch that is writing TRACE)
  trace_check.py watch TRACE REF STOP      `prefix` in a loop until the file STOP exists;
                                           prints the counts of reads
  trace_check.py equal A B                 same samples with the same attributes and the same
                                           dataset values, bit for bit (root attribute 'created',
                                           the creation time, is ignored)

Exit status 0 when the check holds, 1 with a message on stderr when it does not.
"""
import sys

import h5py
import numpy as np

IGNORED_ROOT_ATTRS = {"created"}


def fail(msg):
    print("trace_check: " + msg, file=sys.stderr)
    sys.exit(1)


def attrs_of(obj, ignored=()):
    out = {}
    for k, v in obj.attrs.items():
        if k in ignored:
            continue
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        if isinstance(v, np.ndarray):
            v = v.tobytes()
        out[k] = v
    return out


def datasets_of(group):
    found = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    group.visititems(visit)
    return found


def check_sample(f, name):
    s = f["samples"][name]
    L, K, N = int(f.attrs["num_layers"]), int(f.attrs["top_k"]), int(f.attrs["num_experts"])
    tid = s["tokens/id"][()]
    T = len(tid)
    where = "/samples/" + name
    if int(s.attrs["n_tokens"]) != T:
        fail(where + ": n_tokens != len(tokens/id)")
    for ds, shape in (("n_real", (L, T)), ("null_mass", (L, T)), ("lse", (L, T)),
                      ("slot", (L, T, K)), ("prob", (L, T, K)), ("gate", (L, T, K))):
        got = s["routing/" + ds][()]
        if got.shape != shape:
            fail("%s: routing/%s has shape %s, expected %s" % (where, ds, got.shape, shape))
    slot = s["routing/slot"][()]
    if slot.min() < -1 or slot.max() > N - 1:
        fail(where + ": routing/slot outside [-1, N-1]")
    if not (s["routing/n_real"][()] == (slot >= 0).sum(-1)).all():
        fail(where + ": n_real != (slot >= 0).sum(-1)")
    for ds in ("text", "modality", "segment", "patch"):
        s["tokens/" + ds][()]


def intact(path, names):
    with h5py.File(path, "r") as f:
        if f.attrs["format"] not in ("nullmap-trace", b"nullmap-trace"):
            fail(path + ": not a nullmap trace")
        present = set(f["samples"])
        missing = [n for n in names if n not in present]
        if missing:
            fail("%s: %d committed sample(s) missing: %s" % (path, len(missing), " ".join(missing[:10])))
        for name in sorted(present):
            check_sample(f, name)
        print(len(present))


def equal(a, b):
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        ra, rb = attrs_of(fa, IGNORED_ROOT_ATTRS), attrs_of(fb, IGNORED_ROOT_ATTRS)
        if ra != rb:
            diff = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
            fail("root attributes differ: " + ", ".join(diff))
        na, nb = sorted(fa["samples"]), sorted(fb["samples"])
        if na != nb:
            fail("sample names differ: %d vs %d samples, first difference %s" %
                 (len(na), len(nb), next((x for x, y in zip(na, nb) if x != y), "at the end")))
        for name in na:
            same_sample(fa, fb, name)
        print("equal: %d samples" % len(na))


def same_sample(fa, fb, name):
    ga, gb = fa["samples"][name], fb["samples"][name]
    if attrs_of(ga) != attrs_of(gb):
        fail("/samples/%s: attributes differ" % name)
    da, db = datasets_of(ga), datasets_of(gb)
    if sorted(da) != sorted(db):
        fail("/samples/%s: datasets differ: %s vs %s" % (name, sorted(da), sorted(db)))
    for ds in da:
        x, y = da[ds][()], db[ds][()]
        if x.dtype != y.dtype or x.shape != y.shape:
            fail("/samples/%s/%s: type or shape differ" % (name, ds))
        if x.dtype.kind == "O":
            same = [u if isinstance(u, bytes) else u.encode() for u in x.ravel()] == \
                   [u if isinstance(u, bytes) else u.encode() for u in y.ravel()]
        else:
            same = x.tobytes() == y.tobytes()
        if not same:
            fail("/samples/%s/%s: values differ" % (name, ds))
        if attrs_of(da[ds]) != attrs_of(db[ds]):
            fail("/samples/%s/%s: attributes differ" % (name, ds))


def prefix(path, ref):
    """One committed state of a batch writing `path` from scratch: its samples are the first n
    of the finished trace `ref`, each with the same values."""
    with h5py.File(path, "r") as f, h5py.File(ref, "r") as fr:
        names, ref_names = sorted(f["samples"]), sorted(fr["samples"])
        if names != ref_names[:len(names)]:
            fail("%s: samples %s... are not the first %d of %s" % (path, names[:3], len(names), ref))
        for name in names:
            same_sample(f, fr, name)
        print(len(names))


def watch(path, ref, stop_file):
    """Reads `path` again and again (as `prefix`) until `stop_file` exists. Prints
    'reads N consistent N refused N' where refused = an open that HDF5 refused because the
    writer held the file's lock at that instant (a clear error, never data); fails on any
    inconsistent or unreadable state."""
    import os
    reads = consistent = refused = 0
    while not os.path.exists(stop_file):
        if not os.path.exists(path):
            continue
        reads += 1
        try:
            f = h5py.File(path, "r")
        except FileNotFoundError:
            continue
        except OSError as e:
            if "unable to lock" in str(e):
                refused += 1
                continue
            fail("%s: cannot open: %s" % (path, e))
        with f, h5py.File(ref, "r") as fr:
            names, ref_names = sorted(f["samples"]), sorted(fr["samples"])
            if names != ref_names[:len(names)]:
                fail("%s: samples %s... are not the first %d of %s" % (path, names[:3], len(names), ref))
            for name in names:
                same_sample(f, fr, name)
        consistent += 1
    print("reads %d consistent %d refused %d" % (reads, consistent, refused))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "intact":
        intact(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "equal":
        equal(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "prefix":
        prefix(sys.argv[2], sys.argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
