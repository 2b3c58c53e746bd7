#!/usr/bin/env python3
"""Base-model speed: atmoe against llama.cpp on the same weights, in the same run.

Both run the SmolLM2-135M-Instruct weights at the same precision and thread count:
  - bf16: atmoe --dtype bf16 vs llama.cpp on a BF16 GGUF requantised from the Q4_1 file
  - f32:  atmoe --dtype f32  vs llama.cpp on an F32 GGUF requantised from the Q4_1 file
Measured: prefill tok/s (512-token prompt), decode tok/s at batch 1 and batch 16 (greedy,
64 steps after a 32-token prompt per sequence), best of --reps; atmoe and llama.cpp are
measured alternately --rounds times and the medians reported, because the machine is shared. atmoe's numbers come from
`atmoe bench --json`; llama.cpp's from llama-cpp-python's low-level API (llama_decode on
a llama_batch, one sequence id per stream, default F16 KV cache as users get it).

Usage: bench_vs_llamacpp.py --atmoe build/apps/atmoe --model MODEL.Q4_1.gguf
         [--threads 2] [--reps 3] [--out bench/results/base_cpu.json]
"""
import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import llama_cpp as L


def requantize(src, dst, ftype):
    if os.path.exists(dst):
        return dst
    p = L.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    if L.llama_model_quantize(src.encode(), (dst + ".part").encode(), p) != 0:
        sys.exit(f"quantize to ftype {ftype} failed")
    os.replace(dst + ".part", dst)
    return dst


@L.llama_log_callback
def _quiet(level, text, user_data):
    pass


class LlamaCpp:
    def __init__(self, path, threads, n_ctx=4096, n_seq=16):
        L.llama_backend_init()
        L.llama_log_set(_quiet, ctypes.c_void_p())
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = True  # one KV pool shared by the sequences, as llama-server does
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(512, 0, n_seq)

    def clear(self):
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, entries):
        """entries: list of (token, pos, seq, want_logits)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (t, p, s, lg) in enumerate(entries):
            b.token[i] = t
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = 1 if lg else 0
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            sys.exit(f"llama_decode failed: {rc}")

    def argmax(self, i):
        ptr = L.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def timed_decode(self, B, steps, rng, prompt=32):
        """B sequences: a random `prompt`-token prefill each, then `steps` greedy steps
        of all B together, timed. Returns tokens/s."""
        self.clear()
        entries = []
        for s in range(B):
            toks = rng.integers(0, self.n_vocab, size=prompt).tolist()
            entries += [(t, i, s, i == prompt - 1) for i, t in enumerate(toks)]
        self.decode(entries)
        nxt = [self.argmax(s * prompt + prompt - 1) for s in range(B)]
        t0 = time.perf_counter()
        for step in range(steps):
            self.decode([(nxt[s], prompt + step, s, True) for s in range(B)])
            nxt = [self.argmax(s) for s in range(B)]
        return B * steps / (time.perf_counter() - t0)


def bench_llamacpp(path, threads, reps, prompt_len, steps, batch):
    m = LlamaCpp(path, threads)
    rng = np.random.default_rng(1234)
    res = {}
    best = 0
    for _ in range(reps):
        m.clear()
        toks = rng.integers(0, m.n_vocab, size=prompt_len).tolist()
        t0 = time.perf_counter()
        m.decode([(t, i, 0, i == prompt_len - 1) for i, t in enumerate(toks)])
        best = max(best, prompt_len / (time.perf_counter() - t0))
    res["prefill_tok_s"] = best
    for B, key in ((1, "decode_b1_tok_s"), (batch, "decode_batch_tok_s")):
        res[key] = max(m.timed_decode(B, steps, rng) for _ in range(reps))
    return res


def bench_atmoe(exe, model, dtype, threads, reps, prompt_len, steps, batch, tmp, gemm="simd"):
    env = dict(os.environ, ATMOE_THREADS=str(threads), ATMOE_PREFILL_GEMM=gemm)
    cmd = [exe, "bench", "--model", model, "--dtype", dtype, "--reps", str(reps), "--prompt-tokens", str(prompt_len),
           "--decode-tokens", str(steps), "--batch", str(batch), "--json", tmp]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(tmp) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atmoe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate atmoe and llama.cpp this many times; medians are reported (the machine is noisy)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cache = os.path.dirname(os.path.abspath(a.model))
    ggufs = {"bf16": requantize(a.model, os.path.join(cache, "SmolLM2-135M-Instruct.BF16-from-Q4_1.gguf"), 32),
             "f32": requantize(a.model, os.path.join(cache, "SmolLM2-135M-Instruct.F32-from-Q4_1.gguf"), 0)}
    rows = []
    for dt in a.dtypes.split(","):
        runs = {"ours": [], "blas": [], "peer": []}
        for _ in range(a.rounds):
            runs["ours"].append(bench_atmoe(a.atmoe, a.model, dt, a.threads, a.reps, 512, 64, 16, "/tmp/atmoe_bench.json"))
            runs["blas"].append(bench_atmoe(a.atmoe, a.model, dt, a.threads, a.reps, 512, 4, 1, "/tmp/atmoe_bench.json",
                                            gemm="blas"))
            runs["peer"].append(bench_llamacpp(ggufs[dt], a.threads, a.reps, 512, 64, 16))
        med = lambda rs: {k: float(np.median([r[k] for r in rs])) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        ours, blas, peer = med(runs["ours"]), med(runs["blas"]), med(runs["peer"])
        for k, name in (("prefill_tok_s", "prefill 512"), ("decode_b1_tok_s", "decode b=1"),
                        ("decode_batch_tok_s", "decode b=16")):
            rows.append({"dtype": dt, "metric": name, "atmoe": ours[k], "llama.cpp": peer[k], "ratio": ours[k] / peer[k]})
        rows.append({"dtype": dt, "metric": "prefill 512, atmoe via OpenBLAS sgemm", "atmoe": blas["prefill_tok_s"],
                     "llama.cpp": peer["prefill_tok_s"], "ratio": blas["prefill_tok_s"] / peer["prefill_tok_s"]})
        rows.append({"dtype": dt, "metric": "b=16 / b=1", "atmoe": ours["decode_batch_tok_s"] / ours["decode_b1_tok_s"],
                     "llama.cpp": peer["decode_batch_tok_s"] / peer["decode_b1_tok_s"], "ratio": None})
        rows.append({"dtype": dt, "metric": "floor b=1 (bw/weights)", "atmoe": ours["floor_b1_tok_s"], "llama.cpp": None,
                     "ratio": ours["decode_b1_tok_s"] / ours["floor_b1_tok_s"]})
        rows.append({"dtype": dt, "metric": "peak RSS MiB", "atmoe": ours["peak_rss_mib"], "llama.cpp": None, "ratio": None})
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    print(f"| dtype | metric | atmoe | llama.cpp | atmoe / peer |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['metric']} | {fmt(r['atmoe'])} | {fmt(r['llama.cpp'])} | {fmt(r['ratio'])} |")
    if a.out:
        meta = {"machine": platform.node(), "cpu": subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"],
                capture_output=True, text=True).stdout.strip(), "threads": a.threads,
                "llama_cpp_python": L.__version__, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
