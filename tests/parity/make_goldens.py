#!/usr/bin/env python3
"""Make llama.cpp reference goldens for the SmolLM2-135M-Instruct Q4_1 GGUF.

The reference is llama.cpp (llama-cpp-python) running an F32 GGUF requantised from the
Q4_1 file with llama.cpp's own quantize (allow_requantize): exactly the weights an exact
dequantiser produces. KV cache in F32 so nothing but the weights' values matter.

Writes tests/parity/goldens/smollm2_q4_1.json and smollm2_q4_1_logits.bin:
  - tokenizer: token ids of llama.cpp for each prompt and hard string (parse_special
    true and false);
  - for each of 10 prompts: llama.cpp's 64 greedy tokens, then teacher-forced logits at
    the 64 positions that predict them: the values at a fixed set of 512 vocabulary
    indices (for the relative L2 error) plus top-1 over the whole vocabulary.

Usage: make_goldens.py MODEL.Q4_1.gguf  (needs llama-cpp-python and numpy)
"""
import hashlib
import json
import os
import sys

import numpy as np
import llama_cpp

N_CONT = 64
N_GREEDY = 32
N_SUBSET = 512

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is the boiling point of water in Celsius?<|im_end|>\n<|im_start|>assistant\n",
    "List three primary colors:\n1.",
    "Photosynthesis is the process by which plants",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTranslate 'good morning' to Spanish.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "In 1969, Neil Armstrong became the first person to",
    "Q: What is 12 times 7?\nA:",
]

HARD = [
    "Hello 👋🏽 world 🎉🎉 — emoji ZWJ 👨‍👩‍👧‍👦!",
    "你好，世界。日本語のテキストと한국어 텍스트。",
    "Combining: e\u0301 n\u0303 A\u030a, precomposed: é ñ Å",
    "a" + " " * 23 + "b\n\n\n\t\t  c   \n",
    "Digits 1234567890 3.14159 10,000,000 007 and 2024-11-22",
    "  leading spaces and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
    "don't I'll we've they're it's DON'T",
    "Mixed\r\nline\rendings\n\nend",
    "Кириллица, Ελληνικά, עברית, العربية, हिन्दी",
    "tabs\tand\u00a0non-breaking\u2003spaces",
    "<|im_start|> not quite special <|im_end",
    "",
    " ",
    "https://example.com/path?q=1&x=%20y #hash @user",
]


def requantize(src, dst, ftype):
    if os.path.exists(dst):
        return
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(src.encode(), (dst + ".part").encode(), p)
    if rc != 0:
        sys.exit(f"quantize to ftype {ftype} failed: {rc}")
    os.replace(dst + ".part", dst)


def main():
    src = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.path.join(here, "goldens")
    cache = os.path.dirname(os.path.abspath(src))
    f32 = os.path.join(cache, "SmolLM2-135M-Instruct.F32-from-Q4_1.gguf")
    requantize(src, f32, 0)  # LLAMA_FTYPE_ALL_F32
    llm = llama_cpp.Llama(model_path=f32, n_ctx=512, n_batch=512, logits_all=True, n_threads=2,
                          type_k=0, type_v=0, verbose=False)  # GGML_TYPE_F32 KV cache
    V = llm.n_vocab()
    rng = np.random.default_rng(20261122)
    subset = np.sort(rng.choice(V, size=N_SUBSET, replace=False)).astype(np.int64)

    tok = {"special": [], "plain": []}
    for s in PROMPTS + HARD:
        b = s.encode("utf-8")
        tok["special"].append(llm.tokenize(b, add_bos=False, special=True) if b else [])
        tok["plain"].append(llm.tokenize(b, add_bos=False, special=False) if b else [])

    cases, blobs = [], []
    for p in PROMPTS:
        ptoks = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ptoks)
        gen = []
        for _ in range(N_CONT):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            gen.append(nxt)
            llm.eval([nxt])
        llm.reset()
        seq = ptoks + gen
        llm.eval(seq)
        logits = np.array(llm.scores[len(ptoks) - 1: len(ptoks) - 1 + N_CONT], dtype=np.float64)
        top1 = [int(x) for x in np.argmax(logits, axis=1)]
        norms = [float(x) for x in np.linalg.norm(logits, axis=1)]
        blobs.append(logits[:, subset].astype(np.float32))
        cases.append({"prompt": p, "prompt_tokens": [int(t) for t in ptoks], "continuation": gen,
                      "greedy": gen[:N_GREEDY], "top1": top1, "full_l2": norms})
    with open(src, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    doc = {
        "generator": "tests/parity/make_goldens.py",
        "reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, F32 GGUF requantised from Q4_1, F32 KV cache",
        "model_file": os.path.basename(src), "model_sha256": sha, "n_vocab": V,
        "subset": subset.tolist(), "n_cont": N_CONT,
        "logits_file": "smollm2_q4_1_logits.bin",
        "logits_layout": "float32 LE [prompt][position][subset index]",
        "cases": cases,
        "tokenizer": {"strings": PROMPTS + HARD, "special": tok["special"], "plain": tok["plain"]},
    }
    os.makedirs(out_dir, exist_ok=True)
    np.concatenate(blobs).astype("<f4").tofile(os.path.join(out_dir, "smollm2_q4_1_logits.bin"))
    with open(os.path.join(out_dir, "smollm2_q4_1.json"), "w") as fh:
        json.dump(doc, fh, ensure_ascii=False, indent=1)
    print("wrote goldens:", len(cases), "prompts,", len(doc["tokenizer"]["strings"]), "tokenizer strings")


if __name__ == "__main__":
    main()
