#!/usr/bin/env python3
"""PEFT goldens for atmoe's experts (tests/parity/test_peft_parity.cpp).

Builds, with the atmoe binary, a deterministic synth-model (HF format, f32) and a
synth-bundle of three one-expert groups with heterogeneous ranks on all seven modules,
then computes with torch + transformers + peft:
  - single:  PeftModel with expert 0 alone             (atmoe: --adapter <expert 0>)
  - cat:     add_weighted_adapter(all three, weights, combination_type="cat")
                                                       (atmoe: --pin with those weights)
Logits of every position of a fixed token sequence are stored with an FNV-1a-64 hash of
every generated file, so the C++ test knows it rebuilt the same model and experts.

Usage: make_peft_goldens.py ATMOE_BINARY   (needs torch, transformers, peft)
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
import peft
from transformers import LlamaForCausalLM
from peft import PeftModel

MODEL_ARGS = ["--seed", "21", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
              "--ffn", "96", "--vocab", "320"]
BUNDLE_ARGS = ["--groups", "3", "--experts-per-group", "1", "--rank", "4,8,6", "--seed", "8", "--b-std", "0.2"]
TOKENS = [5, 77, 300, 12, 9, 250, 31, 31, 140, 2, 64, 199, 18, 256, 7, 101]
WEIGHTS = [0.5, 0.3, 0.2]


def fnv1a64(path):
    h = 0xcbf29ce484222325
    with open(path, "rb") as f:
        for b in f.read():
            h ^= b
            h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    atmoe = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    work = tempfile.mkdtemp(prefix="atmoe_peft_")
    mdir, bdir = os.path.join(work, "model"), os.path.join(work, "bundle")
    subprocess.run([atmoe, "synth-model", "--out", mdir] + MODEL_ARGS, check=True)
    subprocess.run([atmoe, "synth-bundle", "--base", mdir, "--out", bdir] + BUNDLE_ARGS, check=True)
    man = json.load(open(os.path.join(bdir, "atmoe.json")))
    experts = [e for g in man["groups"] for e in g["experts"]]
    hashes = {"model/model.safetensors": fnv1a64(os.path.join(mdir, "model.safetensors"))}
    for e in experts:
        rel = e["adapter"] + "/adapter_model.safetensors"
        hashes["bundle/" + rel] = fnv1a64(os.path.join(bdir, rel))

    torch.manual_seed(0)
    ids = torch.tensor([TOKENS])

    def base():
        m = LlamaForCausalLM.from_pretrained(mdir, torch_dtype=torch.float32, attn_implementation="eager")
        return m.eval()

    with torch.no_grad():
        plain = base()(ids).logits[0].double()
        single_model = PeftModel.from_pretrained(base(), os.path.join(bdir, experts[0]["adapter"]),
                                                 adapter_name=experts[0]["name"]).eval()
        single = single_model(ids).logits[0].double()
        cat_model = PeftModel.from_pretrained(base(), os.path.join(bdir, experts[0]["adapter"]),
                                              adapter_name=experts[0]["name"])
        for e in experts[1:]:
            cat_model.load_adapter(os.path.join(bdir, e["adapter"]), adapter_name=e["name"])
        cat_model.add_weighted_adapter([e["name"] for e in experts], WEIGHTS, adapter_name="mix",
                                       combination_type="cat")
        cat_model.set_adapter("mix")
        cat = cat_model.eval()(ids).logits[0].double()

    rel = lambda a, b: float(torch.linalg.norm(a - b) / torch.linalg.norm(b))
    print(f"single vs base rel L2 {rel(single, plain):.3g}; cat vs base {rel(cat, plain):.3g}")
    doc = {
        "generator": "tests/parity/make_peft_goldens.py",
        "reference": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                     "float32, eager attention",
        "synth_model_args": MODEL_ARGS, "synth_bundle_args": BUNDLE_ARGS, "fnv1a64": hashes,
        "tokens": TOKENS, "experts": [e["name"] for e in experts], "cat_weights": WEIGHTS,
        "base": plain.flatten().tolist(), "single": single.flatten().tolist(), "cat": cat.flatten().tolist(),
    }
    out = os.path.join(here, "goldens", "peft_synth.json")
    with open(out, "w") as f:
        json.dump(doc, f)
    print("wrote", out)


if __name__ == "__main__":
    main()
