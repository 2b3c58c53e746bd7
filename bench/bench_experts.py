#!/usr/bin/env python3
"""Expert mixtures on SmolLM2-135M-Instruct: atmoe against its own base-only decode and
against llama.cpp with the same adapters, in the same run, bf16, same thread count.

For E = 1, 4, 16, 64 rank-8 LoRA experts on all seven modules (synth-bundle; 4 groups
when E >= 4), `atmoe bench --bundle` measures decode tok/s at batch 1 and 16 with the
router dense, and with top-1 of 4 groups, interleaved with base-only runs.

llama.cpp gets the same 16 experts as GGUF LoRA adapters (written here with the gguf
package exactly as convert_lora_to_gguf.py lays them out: <tensor>.lora_a [r, d_in],
<tensor>.lora_b [d_out, r], F32 — the fastest of F32/F16/BF16 for llama.cpp here —
q/k lora_b rows permuted like the base), all 16 applied
at fixed scales (1/16 each) to the BF16 GGUF of the base:
  (b) 16 dense experts at fixed weights: atmoe (pins 1/4 per group, uniform inside) vs
      llama.cpp, batch 1 and 16;
  (c) 16 sequences, each with its own mixture of the 16 experts: atmoe runs them as one
      batch (router on random prompts: a different mixture per sequence); llama.cpp must
      run differing LoRA configurations one after another: 16 sequences sequentially,
      the scales changed before each.

Usage: bench_experts.py --atmoe build/apps/atmoe --model MODEL.Q4_1.gguf [--threads 2]
         [--experts 1,4,16,64] [--out bench/results/experts_cpu_smollm2.json]
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
import gguf
import llama_cpp as L
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_llamacpp import LlamaCpp, requantize  # noqa: E402

MODS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
        "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def make_bundle(atmoe, model, out, n):
    if os.path.exists(os.path.join(out, "atmoe.json")):
        return out
    groups, per = (1, 1) if n == 1 else (4, n // 4)
    subprocess.run([atmoe, "synth-bundle", "--base", model, "--out", out, "--groups", str(groups),
                    "--experts-per-group", str(per), "--rank", "8", "--seed", "1", "--b-std", "0.01"],
                   check=True, stderr=subprocess.DEVNULL)
    return out


def peft_to_gguf_lora(adapter_dir, out, n_head=9, n_head_kv=3):
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    t = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    w = gguf.GGUFWriter(out, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
    for k, a in sorted(t.items()):
        if ".lora_A." not in k:
            continue
        b = t[k.replace(".lora_A.", ".lora_B.")]
        parts = k.split(".")
        layer, mod = int(parts[4]), parts[6]
        if mod in ("q_proj", "k_proj"):  # the base's GGUF permutation, on lora_b's rows
            h = n_head if mod == "q_proj" else n_head_kv
            b = b.reshape(h, 2, b.shape[0] // h // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)
        name = f"blk.{layer}.{MODS[mod]}.weight"
        w.add_tensor(name + ".lora_a", a.astype(np.float32))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(b).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def atmoe_bench(atmoe, bundle, threads, extra):
    tmp = "/tmp/atmoe_bench_experts.json"
    env = dict(os.environ, ATMOE_THREADS=str(threads))
    subprocess.run([atmoe, "bench", "--bundle", bundle, "--reps", "4", "--prompt-tokens", "64", "--decode-tokens", "64",
                    "--batch", "16", "--json", tmp] + extra, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.load(open(tmp))


def llama_lora_bench(base_gguf, lora_paths, threads, steps=64, reps=3):
    m = LlamaCpp(base_gguf, threads)
    adapters = [L.llama_adapter_lora_init(m.model, p.encode()) for p in lora_paths]
    n = len(adapters)
    arr = (L.llama_adapter_lora_p_ctypes * n)(*adapters)
    rng = np.random.default_rng(7)

    def set_scales(s):
        L.llama_set_adapters_lora(m.ctx, arr, n, (ctypes.c_float * n)(*s))

    def decode(B, scales_per_seq=None):
        best = 0
        for _ in range(reps):
            if scales_per_seq is None:
                set_scales([1.0 / n] * n)
                best = max(best, m.timed_decode(B, steps, rng))
            else:  # each sequence its own mixture: one after another
                t0 = time.perf_counter()
                for s in range(B):
                    set_scales(scales_per_seq[s])
                    m.clear()
                    toks = rng.integers(0, m.n_vocab, size=32).tolist()
                    m.decode([(t, i, 0, i == 31) for i, t in enumerate(toks)])
                    nxt = m.argmax(31)
                    for step in range(steps):
                        m.decode([(nxt, 32 + step, 0, True)])
                        nxt = m.argmax(0)
                best = max(best, B * steps / (time.perf_counter() - t0))
        return best

    res = {"b1": decode(1), "b16": decode(16)}
    mixes = [list(rng.dirichlet(np.ones(n))) for _ in range(16)]
    res["sequential_mixtures_16"] = decode(16, mixes)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atmoe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--experts", default="1,4,16,64")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cache = os.path.dirname(os.path.abspath(a.model))
    bdir = os.path.join(os.path.dirname(cache), "bundles")
    os.makedirs(bdir, exist_ok=True)
    rows = []
    bundles = {}
    for n in [int(x) for x in a.experts.split(",")]:
        b = make_bundle(a.atmoe, a.model, os.path.join(bdir, f"bench-e{n}"), n)
        bundles[n] = b
        dense = atmoe_bench(a.atmoe, b, a.threads, [])
        row = {"experts": n, "base_b1": dense["decode_b1_tok_s"], "base_b16": dense["decode_batch_tok_s"],
               "dense_b1": dense["experts_decode_b1_tok_s"], "dense_b16": dense["experts_decode_batch_tok_s"]}
        if n >= 4:
            top1 = atmoe_bench(a.atmoe, b, a.threads, ["--top-k-groups", "1"])
            row.update({"top1_base_b16": top1["decode_batch_tok_s"], "top1_b1": top1["experts_decode_b1_tok_s"],
                        "top1_b16": top1["experts_decode_batch_tok_s"]})
        rows.append(row)
        print(json.dumps(row), flush=True)
    peer = {}
    if 16 in bundles:
        man = json.load(open(os.path.join(bundles[16], "atmoe.json")))
        loras = []
        for g in man["groups"]:
            for e in g["experts"]:
                p = os.path.join(bundles[16], e["adapter"], "lora_f32.gguf")
                if not os.path.exists(p):
                    peft_to_gguf_lora(os.path.join(bundles[16], e["adapter"]), p)
                loras.append(p)
        bf16 = requantize(a.model, os.path.join(cache, "SmolLM2-135M-Instruct.BF16-from-Q4_1.gguf"), 32)
        peer = llama_lora_bench(bf16, loras, a.threads)
        fixed = atmoe_bench(a.atmoe, bundles[16], a.threads,
                            ["--pin", ",".join(f"{g['name']}=1" for g in man["groups"]), "--tau-expert", "1e9"])
        peer["atmoe_fixed_b1"] = fixed["experts_decode_b1_tok_s"]
        peer["atmoe_fixed_b16"] = fixed["experts_decode_batch_tok_s"]
        print(json.dumps(peer), flush=True)
    print("\n| experts | base b=1 | dense b=1 | base b=16 | dense b=16 | top-1/4 groups b=16 (overhead vs base b=16) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = (f"{r['top1_b16']:.1f} ({100 * (r['top1_base_b16'] / r['top1_b16'] - 1):+.1f}%)" if "top1_b16" in r else "")
        print(f"| {r['experts']} | {r['base_b1']:.1f} | {r['dense_b1']:.1f} | {r['base_b16']:.1f} | {r['dense_b16']:.1f} | {t} |")
    if peer:
        r16 = next(r for r in rows if r["experts"] == 16)
        print("\n| 16 experts, rank 8 | atmoe tok/s | llama.cpp tok/s | ratio |\n|---|---|---|---|")
        print(f"| (b) fixed weights, batch 1 | {peer['atmoe_fixed_b1']:.1f} | {peer['b1']:.1f} | {peer['atmoe_fixed_b1'] / peer['b1']:.2f} |")
        print(f"| (b) fixed weights, batch 16 | {peer['atmoe_fixed_b16']:.1f} | {peer['b16']:.1f} | {peer['atmoe_fixed_b16'] / peer['b16']:.2f} |")
        print(f"| (c) 16 sequences, 16 different mixtures | {r16['dense_b16']:.1f} | {peer['sequential_mixtures_16']:.1f} | "
              f"{r16['dense_b16'] / peer['sequential_mixtures_16']:.2f} |")
    if a.out:
        meta = {"machine": platform.node(), "threads": a.threads, "llama_cpp_python": L.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        json.dump({"meta": meta, "rows": rows, "llama_cpp_16": peer}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
