#!/usr/bin/env python3
"""End-to-end checks of how atmoe treats bad and borderline inputs.

    python3 tests/e2e/bad_inputs.py ATMOE_BIN WORKDIR

Makes a tiny model and valid bundles with the binary itself (synth-model, synth-bundle),
then generates broken variants (a copy of a valid bundle with one thing broken each; no
committed binaries) and runs the binary on each. Every bad case must: exit 2, print
exactly one stderr line that starts with "atmoe: error: " and matches a case-specific
regex (the file and the tensor/field/flag), print nothing on stdout, finish within the
timeout (a hang is a failure). Every legitimate variant must exit 0.
Standard library only (safetensors, f16/bf16 and .npy are written by hand).
"""
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time

TIMEOUT = 30.0       # seconds per command; a hang is a failure
FIFO_TIMEOUT = 10.0  # FIFO cases must be refused at once; keep a hang from eating the run

BIN = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else ""
WORK = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else ""
results = []  # (name, ok, detail)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- running the binary

def run(args, env=None, timeout=TIMEOUT, stdout=None):
    """-> (rc, stdout, stderr, seconds); rc None on timeout."""
    e = dict(os.environ)
    for k in list(e):
        if k.startswith("ATMOE_"):
            del e[k]
    if env:
        e.update(env)
    t0 = time.monotonic()
    try:
        p = subprocess.run([BIN] + [str(a) for a in args], env=e, timeout=timeout, stdin=subprocess.DEVNULL,
                           stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE)
        out = p.stdout.decode("utf-8", "replace") if p.stdout is not None else ""
        last_err[0] = p.stderr.decode("utf-8", "replace")
        return p.returncode, out, p.stderr.decode("utf-8", "replace"), time.monotonic() - t0
    except subprocess.TimeoutExpired as ex:
        err = ex.stderr.decode("utf-8", "replace") if ex.stderr else ""
        return None, "", err, time.monotonic() - t0


def short(s, n=300):
    s = s.strip().replace("\n", "\\n")
    return s if len(s) <= n else s[:n] + "..."


VERBOSE = os.environ.get("BAD_INPUTS_VERBOSE") == "1"  # also show the stderr line of passing cases
last_err = [""]


def record(name, ok, detail=""):
    results.append((name, ok, detail))
    print(("ok   %s" % name) if ok else ("FAIL %s (%s)" % (name, detail)), flush=True)
    if ok and VERBOSE and last_err[0]:
        print("       " + short(last_err[0], 400), flush=True)
    last_err[0] = ""


def check_error(rc, out, err, pattern, rc_want=2, stdout_empty=True):
    """'' if (rc, out, err) is a proper one-line input error matching pattern, else why not."""
    if rc is None:
        return "timeout (hang)"
    lines = err.splitlines()
    why = []
    if rc_want is None:
        if rc == 0:
            why.append("rc=0")
    elif rc != rc_want:
        why.append("rc=%s" % rc)
    if len(lines) != 1:
        why.append("%d stderr lines" % len(lines))
    elif not lines[0].startswith("atmoe: error: "):
        why.append("no 'atmoe: error: ' prefix")
    elif pattern and not re.search(pattern, lines[0]):
        why.append("does not match /%s/" % pattern)
    if stdout_empty and out:
        why.append("stdout %r" % short(out, 60))
    return "" if not why else ", ".join(why) + ": " + short(err)


def bad(name, args, pattern, env=None, timeout=TIMEOUT, setup=None):
    """A bad input: exit 2, one stderr line matching pattern, empty stdout, no hang."""
    try:
        if setup:
            setup()
    except Exception as ex:  # a broken setup is a script bug: report it loudly
        record(name, False, "SCRIPT SETUP ERROR: %r" % ex)
        return
    rc, out, err, _ = run(args, env=env, timeout=timeout)
    why = check_error(rc, out, err, pattern)
    record(name, not why, why)


def good(name, args, env=None, setup=None):
    try:
        if setup:
            setup()
    except Exception as ex:
        record(name, False, "SCRIPT SETUP ERROR: %r" % ex)
        return None
    rc, out, err, _ = run(args, env=env)
    ok = rc == 0
    record(name, ok, "" if ok else "rc=%s, %s" % (rc if rc is not None else "timeout", short(err)))
    return out if ok else None


def both(*words):
    """A regex that needs every word (any order)."""
    return "".join("(?=.*%s)" % w for w in words)


# ---------------------------------------------------------------- safetensors / npy by hand

DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2}


def st_read(path):
    """-> (list of [name, dtype, shape, bytes], metadata or None)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = hdr.pop("__metadata__", None)
    items = sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [[k, v["dtype"], list(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]]] for k, v in items], meta


def st_write(path, tensors, meta=None):
    hdr, off, blobs = {}, 0, []
    if meta is not None:
        hdr["__metadata__"] = meta
    for name, dt, shape, blob in tensors:
        n = 1
        for s in shape:
            n *= s
        assert len(blob) == n * DTYPE_SIZE[dt], (name, dt, shape, len(blob))
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(blob)]}
        off += len(blob)
        blobs.append(blob)
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def decode(dt, blob):
    if dt == "F32":
        return list(struct.unpack("<%df" % (len(blob) // 4), blob))
    if dt == "F16":
        return list(struct.unpack("<%de" % (len(blob) // 2), blob))
    if dt == "BF16":
        return [struct.unpack("<f", struct.pack("<I", u << 16))[0] for u in struct.unpack("<%dH" % (len(blob) // 2), blob)]
    raise ValueError(dt)


def encode(dt, vals):
    if dt == "F32":
        return struct.pack("<%df" % len(vals), *vals)
    if dt == "F16":
        return struct.pack("<%de" % len(vals), *vals)
    if dt == "BF16":  # truncate the f32 bits (NaN/Inf stay NaN/Inf)
        return struct.pack("<%dH" % len(vals), *[struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in vals])
    raise ValueError(dt)


def st_set(path, key_re, fn):
    """Applies fn(list of floats) -> list to the one tensor whose name matches key_re."""
    ts, meta = st_read(path)
    hits = [t for t in ts if re.fullmatch(key_re, t[0])]
    assert len(hits) == 1, (path, key_re, [t[0] for t in ts])
    t = hits[0]
    t[3] = encode(t[1], fn(decode(t[1], t[3])))
    st_write(path, ts, meta)


def poke(value, where="mid"):
    def f(v):
        i = len(v) // 2 + 1 if where == "mid" else 0
        v[i] = value
        return v
    return f


def st_convert(path, dt):
    ts, meta = st_read(path)
    for t in ts:
        t[3] = encode(dt, decode(t[1], t[3]))
        t[1] = dt
    st_write(path, ts, meta)


def npy_write(path, rows, cols, vals, descr="<f4"):
    fmt = "<%d%s" % (len(vals), "f" if descr == "<f4" else "d")
    h = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (descr, rows, cols)
    pad = -(10 + len(h) + 1) % 64
    h = (h + " " * pad + "\n").encode("latin1")
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + struct.pack(fmt, *vals))


# ---------------------------------------------------------------- bundle edits

def jload(p):
    with open(p) as f:
        return json.load(f)


def jsave(p, j):
    with open(p, "w") as f:
        json.dump(j, f, indent=1)


def jedit(p, fn):
    j = jload(p)
    r = fn(j)
    jsave(p, j if r is None else r)


def transpose_adapter(adapter_dir):
    """Stores every tensor transposed and sets fan_in_fan_out, as PEFT does for Conv1D layers."""
    p = os.path.join(adapter_dir, "adapter_model.safetensors")
    ts, meta = st_read(p)
    for t in ts:
        rows, cols = t[2]
        v = decode(t[1], t[3])
        t[3] = encode(t[1], [v[i * cols + j] for j in range(cols) for i in range(rows)])
        t[2] = [cols, rows]
    st_write(p, ts, meta)
    jedit(os.path.join(adapter_dir, "adapter_config.json"), lambda c: c.update(fan_in_fan_out=True))


def copy(src, name):
    dst = os.path.join(WORK, name)
    if os.path.lexists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def W(*p):
    return os.path.join(WORK, *p)


# ---------------------------------------------------------------- the cases

def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    if not os.access(BIN, os.X_OK):
        print("FAIL binary %s not found / not executable" % BIN)
        return 1
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    t_start = time.monotonic()

    M, B, BN, T = W("m"), W("bun"), W("bun_nogen"), W("trex")
    gen = lambda d, *extra: ["generate", "--bundle", d, "--prompt", "x", "--max-tokens", "2", "--temperature", "0", *extra]
    genm = lambda *extra: ["generate", "--model", M, "--prompt", "x", "--max-tokens", "2", "--temperature", "0", *extra]

    # --- setup: tiny model and valid bundles, made by the binary itself
    steps = [
        ("setup synth-model", ["synth-model", "--out", M, "--seed", "7", "--layers", "2", "--hidden", "64", "--heads", "4",
                               "--kv-heads", "2", "--ffn", "96", "--vocab", "320"]),
        ("setup synth-bundle --general", ["synth-bundle", "--base", M, "--out", B, "--groups", "3", "--experts-per-group", "2",
                                          "--rank", "4,8", "--seed", "3", "--general"]),
        ("setup synth-bundle (no general)", ["synth-bundle", "--base", M, "--out", BN, "--groups", "3",
                                             "--experts-per-group", "2", "--rank", "4,8", "--seed", "3"]),
        ("setup synth-bundle --method t-rex", ["synth-bundle", "--base", M, "--out", T, "--method", "t-rex", "--trex-mode",
                                               "rank1_flex", "--rank", "4,2", "--router-mapping", "--seed", "4"]),
    ]
    for name, args in steps:
        if good(name, args) is None:
            print("setup failed; nothing else can run")
            return 1
    for name, d in [("valid at-moe bundle generates", B), ("valid bundle without general generates", BN),
                    ("valid t-rex bundle generates", T)]:
        good(name, gen(d))
    good("inspect valid bundle", ["inspect", B])
    good("inspect valid t-rex bundle", ["inspect", T])

    LAW1 = "experts/law-1"
    AMS = "adapter_model.safetensors"
    ACJ = "adapter_config.json"
    KEY = lambda l, mod, ab: r"base_model\.model\.model\.layers\.%d\.%s\.%s\.lora_%s(\.default)?\.weight" % (
        l, "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn", mod, ab)
    law1_st = r"experts/law-1/adapter_model\.safetensors"
    law1_cfg = r"experts/law-1/adapter_config\.json"
    nonfinite = r"(?i:nan|inf|finite)"
    mani = r"atmoe\.json"

    # ================================================================ A. non-finite and absurd weights
    def adapter_poke(case, expert, l, mod, ab, value, dtype=None, src=B):
        def setup():
            d = copy(src, case)
            p = os.path.join(d, "experts", expert, AMS)
            if dtype:
                st_convert(p, dtype)
            st_set(p, KEY(l, mod, ab), poke(value))
        return setup

    for ab in ("A", "B"):
        for label, v in (("nan", NAN), ("+inf", INF), ("-inf", -INF)):
            case = "a_%s_lora_%s_f32" % (label.replace("+", "p").replace("-", "m"), ab)
            bad("A %s in law-1 lora_%s (f32)" % (label, ab), gen(W(case)),
                both(law1_st, r"layers\.1\.mlp\.down_proj\.lora_%s" % ab, nonfinite),
                setup=adapter_poke(case, "law-1", 1, "down_proj", ab, v))
    for dt in ("F16", "BF16"):
        for label, v in (("nan", NAN), ("+inf", INF), ("-inf", -INF)):
            case = "a_%s_lora_B_%s" % (label.replace("+", "p").replace("-", "m"), dt.lower())
            bad("A %s in law-1 lora_B (%s adapter)" % (label, dt), gen(W(case)),
                both(law1_st, r"layers\.0\.self_attn\.q_proj\.lora_B", nonfinite),
                setup=adapter_poke(case, "law-1", 0, "q_proj", "B", v, dt))
    bad("A nan in f16 lora_A", gen(W("a_nan_lora_A_f16")),
        both(law1_st, r"layers\.0\.self_attn\.k_proj\.lora_A", nonfinite),
        setup=adapter_poke("a_nan_lora_A_f16", "law-1", 0, "k_proj", "A", NAN, "F16"))
    bad("A nan in the general expert's lora_A", gen(W("a_nan_general_A")),
        both(r"experts/general/adapter_model\.safetensors", r"layers\.1\.self_attn\.o_proj\.lora_A", nonfinite),
        setup=adapter_poke("a_nan_general_A", "general", 1, "o_proj", "A", NAN))
    bad("A inf in the general expert's lora_B", gen(W("a_inf_general_B")),
        both(r"experts/general/adapter_model\.safetensors", r"layers\.0\.mlp\.up_proj\.lora_B", nonfinite),
        setup=adapter_poke("a_inf_general_B", "general", 0, "up_proj", "B", INF))

    def setup_huge_b():
        d = copy(B, "a_huge_lora_B")
        st_set(os.path.join(d, LAW1, AMS), KEY(0, "v_proj", "B"), lambda v: [3e38] * len(v))
    bad("A lora_B of 3e38 (finite, the product overflows)", gen(W("a_huge_lora_B")),
        both(law1_st, r"layers\.0\.self_attn\.v_proj", "lora_B"), setup=setup_huge_b)

    def cfg_edit(case, fn, expert="law-1", src=B):
        def setup():
            d = copy(src, case)
            jedit(os.path.join(d, "experts", expert, ACJ), fn)
        return setup

    bad("A lora_alpha 1e300", gen(W("a_alpha_huge")), both(law1_cfg, "lora_alpha"),
        setup=cfg_edit("a_alpha_huge", lambda c: c.update(lora_alpha=1e300)))
    bad("A alpha_pattern value 1e300", gen(W("a_alpha_pattern_huge")), both(law1_cfg, "alpha_pattern"),
        setup=cfg_edit("a_alpha_pattern_huge", lambda c: c.update(alpha_pattern={"q_proj": 1e300})))

    def setup_router_nan():
        d = copy(B, "a_router_nan")
        st_set(os.path.join(d, "router.safetensors"), r"layers\.0\.group_gate\.weight", poke(NAN))
    bad("A nan in router group_gate.weight", gen(W("a_router_nan")),
        both(r"router\.safetensors", r"layers\.0\.group_gate\.weight", nonfinite), setup=setup_router_nan)

    trex_st = r"trex/adapter_model\.safetensors"

    def trex_poke(case, key_re, fn):
        def setup():
            d = copy(T, case)
            st_set(os.path.join(d, "trex", AMS), key_re, fn)
        return setup

    tpre = r"base_model\.model\.model\.layers\.1\.self_attn\.q_proj\."
    bad("A t-rex nan in router.weight", gen(W("a_trex_router_nan")),
        both(trex_st, r"layers\.1\.self_attn\.q_proj\.router", nonfinite),
        setup=trex_poke("a_trex_router_nan", tpre + r"router\.weight", poke(NAN)))
    bad("A t-rex nan in lora_A", gen(W("a_trex_A_nan")),
        both(trex_st, r"layers\.1\.self_attn\.q_proj\.lora_A", nonfinite),
        setup=trex_poke("a_trex_A_nan", tpre + r"lora_A\.weight", poke(NAN)))
    bad("A t-rex inf omg weight", gen(W("a_trex_omg_inf")),
        both(trex_st, r"layers\.1\.self_attn\.q_proj\.omg", nonfinite),
        setup=trex_poke("a_trex_omg_inf", tpre + r"omg\.modules_to_save\.default\.weight", lambda v: [INF]))

    def trex_cfg(case, fn):
        def setup():
            d = copy(T, case)
            jedit(os.path.join(d, "trex", ACJ), fn)
        return setup
    trex_cfg_re = r"trex/adapter_config\.json"
    for label, fn, field in (("use_dora true", lambda c: c.update(use_dora=True), "use_dora"),
                             ("peft_type IA3", lambda c: c.update(peft_type="IA3"), "peft_type"),
                             ("fan_in_fan_out true", lambda c: c.update(fan_in_fan_out=True), "fan_in_fan_out"),
                             ("layers_to_transform [0]", lambda c: c.update(layers_to_transform=[0]), "layers_to_transform")):
        case = "c_trex_" + field
        bad("C t-rex adapter_config %s" % label, gen(W(case)), both(trex_cfg_re, field), setup=trex_cfg(case, fn))
    bad("C t-rex target_modules misses modules that have tensors", gen(W("c_trex_tm")),
        both(r"trex/adapter_model\.safetensors", "target"), setup=trex_cfg("c_trex_tm", lambda c: c.update(target_modules=["q_proj"])))

    def setup_cent_nan():
        d = copy(T, "a_centroids_nan")
        st_set(os.path.join(d, "centroids.safetensors"), "centroids", poke(NAN))
    bad("A nan in centroids.safetensors", gen(W("a_centroids_nan")),
        both(r"centroids\.safetensors", nonfinite), setup=setup_cent_nan)

    def npy_bundle(case, descr, value=None):
        def setup():
            d = copy(T, case)
            ts, _ = st_read(os.path.join(d, "centroids.safetensors"))
            (name, dt, shape, blob), = ts
            vals = decode(dt, blob)
            if value is not None:
                vals[len(vals) // 2 + 3] = value
            npy_write(os.path.join(d, "centroids.npy"), shape[0], shape[1], vals, descr)
            os.remove(os.path.join(d, "centroids.safetensors"))
            jedit(os.path.join(d, "atmoe.json"), lambda j: j["t_rex"].update(centroids="centroids.npy"))
        return setup
    # the legitimate .npy variants first: they show the hand-written .npy is valid
    good("G t-rex centroids as float32 .npy", gen(W("g_centroids_npy_f4")), setup=npy_bundle("g_centroids_npy_f4", "<f4"))
    good("G t-rex centroids as float64 .npy", gen(W("g_centroids_npy_f8")), setup=npy_bundle("g_centroids_npy_f8", "<f8"))
    bad("A nan in centroids.npy (f4)", gen(W("a_centroids_npy_nan")), both(r"centroids\.npy", nonfinite),
        setup=npy_bundle("a_centroids_npy_nan", "<f4", NAN))
    bad("A inf in centroids.npy (f8)", gen(W("a_centroids_npy_inf")), both(r"centroids\.npy", nonfinite),
        setup=npy_bundle("a_centroids_npy_inf", "<f8", INF))

    # ================================================================ B. a huge prompt
    pf = W("prompt_100k.txt")
    with open(pf, "w") as f:
        f.write("a" * 100000)
    rc, out, err, secs = run(["generate", "--model", M, "--prompt-file", pf, "--max-tokens", "1", "--temperature", "0"])
    if rc == 0:
        record("B 100,000-byte prompt finishes (%.1fs)" % secs, True)
    else:
        why = check_error(rc, out, err, r"(?i)context")
        record("B 100,000-byte prompt finishes (%.1fs)" % secs, not why, why)

    # ================================================================ C. typed JSON and filesystem errors
    def man_edit(case, fn, src=B):
        def setup():
            d = copy(src, case)
            jedit(os.path.join(d, "atmoe.json"), fn)
        return setup

    man_cases = [
        ("format 1", lambda j: j.update(format=1), "format"),
        ("router.input 1", lambda j: j["router"].update(input=1), "input"),
        ("version \"1\"", lambda j: j.update(version="1"), "version"),
        ("lambda \"0.5\"", lambda j: j.update({"lambda": "0.5"}), "lambda"),
        ("groups {}", lambda j: j.update(groups={}), "groups"),
        ("experts [1]", lambda j: j["groups"][0].update(experts=[1]), "experts"),
        ("tau_group \"x\"", lambda j: j["router"].update(tau_group="x"), "tau_group"),
        ("unknown top-level key lamda", lambda j: j.update(lamda=0.5), "lamda"),
        ("unknown key in router", lambda j: j["router"].update(tau_grup=1.0), "tau_grup"),
        ("unknown key in a group", lambda j: j["groups"][1].update(gruop_bias=1.0), "gruop_bias"),
        ("unknown key in an expert", lambda j: j["groups"][1]["experts"][0].update(adaptor="x"), "adaptor"),
        ("unknown key in general_expert", lambda j: j["general_expert"].update(rank=4), r"\brank\b"),
    ]
    for i, (label, fn, field) in enumerate(man_cases):
        case = "c_man_%d" % i
        bad("C atmoe.json %s" % label, gen(W(case)), both(mani, field), setup=man_edit(case, fn))
    bad("C atmoe.json lambda without a general expert", gen(W("c_man_lam_nogen")), both(mani, "lambda", "general"),
        setup=man_edit("c_man_lam_nogen", lambda j: j.update({"lambda": 0.3}), src=BN))
    bad("C atmoe.json expert name with U+2028", gen(W("c_man_u2028")), both(mani, "name"),
        setup=man_edit("c_man_u2028", lambda j: j["groups"][0]["experts"][0].update(name="a\u2028b")))

    def setup_router_extra():
        d = copy(B, "c_router_extra")
        p = os.path.join(d, "router.safetensors")
        ts, meta = st_read(p)
        ts.append(["layers.0.foo.weight", "F32", [2, 2], encode("F32", [0.0] * 4)])
        st_write(p, ts, meta)
    bad("C unknown tensor in router.safetensors", gen(W("c_router_extra")),
        both(r"router\.safetensors", r"layers\.0\.foo\.weight"), setup=setup_router_extra)

    def setup_loop():
        d = copy(B, "c_man_loop")
        os.remove(os.path.join(d, "atmoe.json"))
        os.symlink("loop_b", os.path.join(d, "atmoe.json"))
        os.symlink("atmoe.json", os.path.join(d, "loop_b"))
    bad("C atmoe.json is a symlink loop", gen(W("c_man_loop")), mani, setup=setup_loop)

    def setup_man_dir():
        d = copy(B, "c_man_dir")
        os.remove(os.path.join(d, "atmoe.json"))
        os.mkdir(os.path.join(d, "atmoe.json"))
    bad("C atmoe.json is a directory", gen(W("c_man_dir")), mani, setup=setup_man_dir)

    def setup_st_dir():
        d = copy(B, "c_st_dir")
        os.remove(os.path.join(d, LAW1, AMS))
        os.mkdir(os.path.join(d, LAW1, AMS))
    bad("C adapter_model.safetensors is a directory", gen(W("c_st_dir")), law1_st, setup=setup_st_dir)

    def fifo_case(name, tag, rel, pattern):
        """A copy of the bundle whose file `rel` is replaced by a FIFO: refused at once."""
        def setup():
            d = copy(B, tag)
            os.remove(os.path.join(d, rel))
            os.mkfifo(os.path.join(d, rel))
        bad(name, gen(W(tag)), pattern, timeout=FIFO_TIMEOUT, setup=setup)

    fifo_case("C adapter_config.json is a FIFO (no hang)", "c_cfg_fifo", os.path.join(LAW1, ACJ), law1_cfg)
    fifo_case("C adapter_model.safetensors is a FIFO (no hang)", "c_st_fifo", os.path.join(LAW1, AMS), law1_st)
    fifo_case("C router.safetensors is a FIFO (no hang)", "c_router_fifo", "router.safetensors",
              r"c_router_fifo/router\.safetensors.*FIFO")
    fifo_case("C base_model is a FIFO (no hang)", "c_base_fifo", "base", both(r"c_base_fifo/base\b", r"base[_ ]model"))

    pdir, pfifo = W("prompt_dir"), W("prompt_fifo")
    os.mkdir(pdir)
    os.mkfifo(pfifo)
    bad("C --prompt-file is a directory", ["generate", "--model", M, "--prompt-file", pdir, "--max-tokens", "2"],
        re.escape(pdir))
    bad("C --prompt-file is a FIFO (no hang)", ["generate", "--model", M, "--prompt-file", pfifo, "--max-tokens", "2"],
        re.escape(pfifo), timeout=FIFO_TIMEOUT)

    cfg_cases = [
        ("r \"8\"", {"r": "8"}, r"\br\b"),
        ("target_modules 5", {"target_modules": 5}, "target_modules"),
        ("lora_alpha \"16\"", {"lora_alpha": "16"}, "lora_alpha"),
        ("use_rslora \"yes\"", {"use_rslora": "yes"}, "use_rslora"),
    ]
    for i, (label, upd, field) in enumerate(cfg_cases):
        case = "c_cfg_%d" % i
        bad("C adapter_config.json %s" % label, gen(W(case)), both(law1_cfg, field),
            setup=cfg_edit(case, lambda c, u=upd: c.update(u)))

    # ================================================================ D. conflicting / inapplicable flags
    ad, pin, msk, tkg = r"adapter", r"\bpin\b", r"mask", r"top[-_]k[-_]groups"
    bad("D --adapter with --mask", gen(B, "--adapter", "law-0", "--mask", "law-1"), both(ad, msk))
    bad("D --adapter with --pin", gen(B, "--adapter", "law-0", "--pin", "law=1"), both(ad, pin))
    bad("D --routing off with --top-k-groups", gen(B, "--routing", "off", "--top-k-groups", "1"), both("routing", tkg))
    bad("D --routing off with --pin", gen(B, "--routing", "off", "--pin", "law=1"), both("routing", pin))
    for flag, val, pat in (("--top-k-groups", "1", tkg), ("--mask", "x", msk), ("--lambda", "0.5", "lambda"),
                           ("--adapter", "x", ad)):
        bad("D %s with --model and no --bundle" % flag, genm(flag, val), both(pat, "bundle"))
    bad("D --omega on an at-moe bundle", gen(B, "--omega", "0.5"), "omega")
    bad("D --pin-cluster on an at-moe bundle", gen(B, "--pin-cluster", "0"), r"pin[-_]cluster")
    bad("D --intuition off on an at-moe bundle", gen(B, "--intuition", "off"), "intuition")
    bad("D --top-k-groups on a t-rex bundle", gen(T, "--top-k-groups", "1"), tkg)
    bad("D --system without --chat", genm("--system", "hi"), both("system", "chat"))
    bad("D --lambda on a bundle without a general expert", gen(BN, "--lambda", "0.5"), both("lambda", "general"))

    # --adapter X = expert X alone at weight 1, no general expert. The default --b-std 0.02 leaves
    # the tiny model's greedy text unchanged by any expert, so these comparisons use bundles with
    # stronger experts (--b-std 0.5; same seed: the group experts are the same bytes in both).
    S, SG = W("strong"), W("strong_gen")
    sargs = ["--base", M, "--groups", "3", "--experts-per-group", "2", "--rank", "4,8", "--seed", "3", "--b-std", "0.5"]
    good("setup strong bundle (no general)", ["synth-bundle", "--out", S, *sargs])
    good("setup strong bundle (general)", ["synth-bundle", "--out", SG, *sargs, "--general"])
    txt = lambda d, *extra: good("D+ runs: %s %s" % (os.path.basename(d), " ".join(extra)),
                                 ["generate", "--bundle", d, "--prompt", "Hello there", "--max-tokens", "8",
                                  "--temperature", "0", "--ignore-eos", *extra])
    base_t = txt(S, "--routing", "off")
    a_ng = txt(S, "--adapter", "medicine-1")
    p_ng = txt(S, "--pin", "medicine=1", "--mask", "medicine-0")
    a_g = txt(SG, "--adapter", "medicine-1")
    p_g1 = txt(SG, "--pin", "medicine=1", "--mask", "medicine-0", "--lambda", "1")
    p_g8 = txt(SG, "--pin", "medicine=1", "--mask", "medicine-0")  # lambda 0.8: the general expert mixed in
    if None in (base_t, a_ng, p_ng, a_g, p_g1, p_g8):
        pass  # already reported
    elif base_t == a_ng or p_g8 == p_g1:
        print("skip D+ comparisons: the experts (%r) or the general expert (%r) do not change the text"
              % (base_t == a_ng, p_g8 == p_g1))
    else:
        record("D+ --adapter X == --pin <group>=1 --mask <others> (no general)", a_ng == p_ng, "%r vs %r" % (a_ng, p_ng))
        record("D+ --adapter X == --pin/--mask --lambda 1 (with general)", a_g == p_g1, "%r vs %r" % (a_g, p_g1))
        same = all(open(os.path.join(S, "experts", e, f), "rb").read() == open(os.path.join(SG, "experts", e, f), "rb").read()
                   for e in ("medicine-0", "medicine-1", "law-0", "law-1", "code-0", "code-1") for f in (AMS, ACJ))
        if same:
            record("D+ --adapter X ignores the general expert (same text as without one)", a_g == a_ng,
                   "%r vs %r" % (a_g, a_ng))
        else:
            print("skip D+ --adapter ignores the general expert: the two synth bundles' experts differ")

    # ================================================================ E. ranges before narrowing; names
    bad("E atmoe.json version 4294967297", gen(W("e_version")), both(mani, "version"),
        setup=man_edit("e_version", lambda j: j.update(version=4294967297)))
    bad("E layers_to_transform [4294967296]", gen(W("e_ltt")), both(law1_cfg, "layers_to_transform"),
        setup=cfg_edit("e_ltt", lambda c: c.update(layers_to_transform=[4294967296])))
    bad("E r 1e30", gen(W("e_r_1e30")), both(law1_cfg, r"\br\b"), setup=cfg_edit("e_r_1e30", lambda c: c.update(r=1e30)))
    bad("E r 4294967304", gen(W("e_r_big")), both(law1_cfg, r"\br\b"),
        setup=cfg_edit("e_r_big", lambda c: c.update(r=4294967304)))
    bad("E rank_pattern value 1e30", gen(W("e_rank_pattern")), both(law1_cfg, "rank_pattern"),
        setup=cfg_edit("e_rank_pattern", lambda c: c.update(rank_pattern={"q_proj": 1e30})))

    seed_args = lambda s: ["generate", "--model", M, "--prompt", "Hello", "--max-tokens", "12", "--temperature", "1",
                           "--top-k", "0", "--top-p", "1", "--ignore-eos", "--seed", s]
    s63, s63p1 = str(2 ** 63), str(2 ** 63 + 1)
    rc, out, err, _ = run(seed_args(s63))
    if rc == 2:
        why = check_error(rc, out, err, "seed")
        record("E --seed 2^63 refused clearly", not why, why)
    elif rc == 0:
        rc2, out2, err2, _ = run(seed_args(s63p1))
        if rc2 != 0:
            record("E --seed 2^63 accepted, 2^63+1 too and differently", False, "2^63+1: rc=%s %s" % (rc2, short(err2)))
        else:
            record("E --seed 2^63 accepted, 2^63+1 too and differently", out != out2, "same text %r" % out)
    else:
        record("E --seed 2^63", False, "rc=%s %s" % (rc, short(err)))
    rc, out, err, _ = run(seed_args(str(2 ** 64 - 1)))
    why = "" if rc == 0 else check_error(rc, out, err, "seed")
    record("E --seed 2^64-1 runs (or is refused clearly)", not why, why)
    bad("E --seed 2^64", seed_args(str(2 ** 64)), "seed")
    bad("E --seed -5", seed_args("-5"), "seed")
    bad("E --top-k-groups 99999999999999999999", gen(B, "--top-k-groups", "99999999999999999999"), tkg)
    bad("E --max-tokens 1e30", ["generate", "--model", M, "--prompt", "x", "--max-tokens", "1e30"], r"max[-_]tokens")

    def rename(gi, ei, new):
        return lambda j: j["groups"][gi]["experts"][ei].update(name=new)
    bad("E expert named like a group", gen(W("e_name_group")), both(mani, r"\bcode\b"),
        setup=man_edit("e_name_group", rename(1, 0, "code")))
    bad("E expert name with ','", gen(W("e_name_comma")), both(mani, r"law,0"),
        setup=man_edit("e_name_comma", rename(1, 0, "law,0")))
    bad("E expert name with '='", gen(W("e_name_eq")), both(mani, r"law=0"),
        setup=man_edit("e_name_eq", rename(1, 0, "law=0")))
    bad("E one adapter dir as two experts in different groups", gen(W("e_dup_dir")), both(mani, r"experts/law-1"),
        setup=man_edit("e_dup_dir", lambda j: j["groups"][2]["experts"][0].update(adapter="experts/law-1")))

    # ================================================================ F. outputs and environment
    tdir = W("a_dir")
    os.mkdir(tdir)
    bad("F --trace into a missing directory (before generating)", gen(B, "--trace", "/nonexistent-dir/t.json"),
        re.escape("/nonexistent-dir/t.json"))
    bad("F --trace is a directory (before generating)", gen(B, "--trace", tdir), re.escape(tdir))
    bad("F explain --out is a directory", ["explain", "--bundle", B, "--prompt", "x", "--out", tdir], re.escape(tdir))
    ne = W("nonempty_out")
    os.mkdir(ne)
    with open(os.path.join(ne, "keep.txt"), "w") as f:
        f.write("mine\n")
    sb = lambda out, *extra: ["synth-bundle", "--base", M, "--out", out, "--groups", "1", "--experts-per-group", "1",
                              "--seed", "1", *extra]
    bad("F synth-bundle --out an existing non-empty directory", sb(ne), re.escape(ne))
    good("F synth-bundle --out an existing non-empty directory with --force", sb(ne, "--force"))
    bad("F synth-bundle --b-std nan", sb(W("sb_nan"), "--b-std", "nan"), r"b[-_]std")
    bad("F synth-bundle --router-gain inf", sb(W("sb_inf"), "--router-gain", "inf"), r"router[-_]gain")
    if os.path.exists("/dev/full"):
        with open("/dev/full", "wb") as full:
            rc, out, err, _ = run(genm("--ignore-eos"), stdout=full)
        why = check_error(rc, out, err, "", rc_want=None)
        record("F generate with stdout on /dev/full", not why, why)
    else:
        print("skip F /dev/full: not present")
    for var, val in (("ATMOE_FORCE_ISA", "sse9"), ("ATMOE_LOG_LEVEL", "bogus"), ("ATMOE_THREADS", "-1"),
                     ("ATMOE_THREADS", "100000000000"), ("ATMOE_THREADS", "abc"), ("ATMOE_SPIN_US", "-3"),
                     ("ATMOE_PREFILL_GEMM", "gpu")):
        bad("F env %s=%s" % (var, val), genm(), var, env={var: val})
    bad("F unknown flag --bogus", ["generate", "--bogus"], "bogus")
    # One non-empty value per occurrence: an empty value is not "the default", two words are not two prompts.
    for flag in ("--temperature", "--max-tokens", "--top-k", "--seed", "--dtype", "--stop", "--system"):
        bad("F empty value for %s" % flag, genm(flag, ""), flag)
    for flag in ("--lambda", "--tau-group", "--pin", "--mask", "--group-bias", "--adapter"):
        bad("F empty value for %s on a bundle" % flag, gen(B) + [flag, ""], flag)
    bad("F --mask ','", gen(B) + ["--mask", ","], "mask")
    bad("F --pin-cluster -1 on a t-rex bundle", gen(T) + ["--pin-cluster", "-1"], r"pin[-_]cluster")
    bad("F --prompt with two words", ["generate", "--model", M, "--prompt", "hello", "world", "--max-tokens", "2"], "world")
    bad("F synth-model --layers 100000 (refused before writing)", ["synth-model", "--out", W("sm_big"), "--seed", "1",
        "--layers", "100000"], "layers")
    record("F a refused synth-model leaves no --out directory", not os.path.exists(W("sm_big")), W("sm_big") + " exists")
    bad("F synth-model --hidden 100000", ["synth-model", "--out", W("sm_big2"), "--seed", "1", "--hidden", "100000"], "hidden")
    bad("F synth-model --seed -1", ["synth-model", "--out", W("sm_neg"), "--seed", "-1"], "seed")
    bad("F synth-bundle --trex-mode on an at-moe bundle", sb(W("sb_tm"), "--trex-mode", "rank1"), r"trex[-_]mode")
    bad("F synth-bundle --rank '4,,8'", sb(W("sb_rank"), "--rank", "4,,8"), "rank")
    record("F a refused synth-bundle leaves no --out directory", not os.path.exists(W("sb_rank")), W("sb_rank") + " exists")
    bad("F synth-bundle t-rex --embedding-dim -1", ["synth-bundle", "--base", M, "--out", W("sb_ed"), "--seed", "1",
        "--method", "t-rex", "--intuition", "embedding", "--embedding-dim", "-1"], r"embedding[-_]dim")
    # A closed pipe is a failed write (exit 1, one line), not death by SIGPIPE.
    p = subprocess.Popen([BIN, "generate", "--model", M, "--prompt", "x", "--max-tokens", "400", "--ignore-eos"],
                         stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items() if not k.startswith("ATMOE_")})
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode("utf-8", "replace")
    rc = p.wait(timeout=TIMEOUT)
    record("F stdout closed early: exit 1, one line", rc == 1 and err.count("\n") == 1 and "stdout" in err,
           "rc=%s, %s" % (rc, short(err)))
    if os.path.exists("/dev/full"):
        for args in (["inspect", M], ["--help"], ["--help-env"]):
            with open("/dev/full", "wb") as full:
                rc, out, err, _ = run(args, stdout=full)
            record("F %s with stdout on /dev/full fails" % " ".join(args[:1]), rc == 1 and "stdout" in err,
                   "rc=%s, %s" % (rc, short(err)))
    bad("F --max-tokens abc", ["generate", "--model", M, "--prompt", "x", "--max-tokens", "abc"], r"max[-_]tokens")

    # ================================================================ G. legitimate variants
    def conv_all(case, dt):
        def setup():
            d = copy(B, case)
            for e in os.listdir(os.path.join(d, "experts")):
                st_convert(os.path.join(d, "experts", e, AMS), dt)
        return setup
    good("G adapters in f16", gen(W("g_f16")), setup=conv_all("g_f16", "F16"))
    good("G adapters in bf16", gen(W("g_bf16")), setup=conv_all("g_bf16", "BF16"))
    good("G target_modules as a regex string", gen(W("g_regex")), setup=cfg_edit(
        "g_regex", lambda c: c.update(target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")))
    good("G use_rslora true", gen(W("g_rslora")), setup=cfg_edit("g_rslora", lambda c: c.update(use_rslora=True)))

    def setup_default_keys():
        d = copy(B, "g_default_keys")
        p = os.path.join(d, LAW1, AMS)
        ts, meta = st_read(p)
        for t in ts:
            t[0] = re.sub(r"\.lora_(A|B)\.weight$", r".lora_\1.default.weight", t[0])
        st_write(p, ts, meta)
    good("G tensor keys with the .default adapter name", gen(W("g_default_keys")), setup=setup_default_keys)

    def setup_fifo_t():
        d = copy(B, "g_fan_in_fan_out")
        transpose_adapter(os.path.join(d, LAW1))
    good("G fan_in_fan_out true (tensors transposed)", gen(W("g_fan_in_fan_out")), setup=setup_fifo_t)

    def setup_ltt():
        d = copy(B, "g_layers_to_transform")
        p = os.path.join(d, LAW1, AMS)
        ts, meta = st_read(p)
        st_write(p, [t for t in ts if ".layers.0." in t[0]], meta)
        jedit(os.path.join(d, LAW1, ACJ), lambda c: c.update(layers_to_transform=[0]))
    good("G layers_to_transform [0]", gen(W("g_layers_to_transform")), setup=setup_ltt)

    def setup_patterns():  # medicine-0 has r 4: q_proj cut to rank 2 with its own alpha
        d = copy(B, "g_patterns")
        p = os.path.join(d, "experts", "medicine-0", AMS)
        ts, meta = st_read(p)
        for t in ts:
            if ".q_proj.lora_A." in t[0]:
                t[2] = [2, t[2][1]]
                t[3] = t[3][:2 * t[2][1] * 4]
            elif ".q_proj.lora_B." in t[0]:
                rows, cols = t[2]
                v = decode(t[1], t[3])
                t[3] = encode(t[1], [v[i * cols + j] for i in range(rows) for j in range(2)])
                t[2] = [rows, 2]
        st_write(p, ts, meta)
        jedit(os.path.join(d, "experts", "medicine-0", ACJ),
              lambda c: c.update(rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 4.0, "o_proj": 16.0}))
    good("G rank_pattern/alpha_pattern entries", gen(W("g_patterns")), setup=setup_patterns)
    good("G per_token router input", gen(W("g_per_token")),
         setup=man_edit("g_per_token", lambda j: j["router"].update(input="per_token")))
    peft_extras = {"task_type": "CAUSAL_LM", "lora_dropout": 0.05, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
                   "revision": None, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
                   "layer_replication": None, "modules_to_save": None, "auto_mapping": None, "megatron_config": None,
                   "megatron_core": "megatron.core", "loftq_config": {}, "eva_config": None, "corda_config": None,
                   "use_dora": False, "lora_bias": False, "exclude_modules": None, "trainable_token_indices": None}
    good("G unknown extra keys in adapter_config.json (as PEFT writes)", gen(W("g_peft_extras")),
         setup=cfg_edit("g_peft_extras", lambda c: c.update(peft_extras)))

    # Same weights, another layout: the text must not change (strong experts, so it would).
    if a_ng is not None and base_t is not None and a_ng != base_t:
        def strong_variant(case, fn):
            d = copy(S, case)
            fn(os.path.join(d, "experts", "medicine-1"))
            return txt(d, "--adapter", "medicine-1")

        def default_keys(e):
            p = os.path.join(e, AMS)
            ts, meta = st_read(p)
            for t in ts:
                t[0] = re.sub(r"\.lora_(A|B)\.weight$", r".lora_\1.default.weight", t[0])
            st_write(p, ts, meta)
        for label, fn in (("fan_in_fan_out", transpose_adapter), (".default keys", default_keys)):
            t = strong_variant("g_same_" + re.sub(r"\W", "", label), fn)
            if t is not None:
                record("G %s gives the same text as the plain adapter" % label, t == a_ng, "%r vs %r" % (t, a_ng))

    # ---------------------------------------------------------------- summary
    failed = [r for r in results if not r[1]]
    print("\n%d cases, %d passed, %d failed (%.1fs)" % (len(results), len(results) - len(failed), len(failed),
                                                        time.monotonic() - t_start))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
