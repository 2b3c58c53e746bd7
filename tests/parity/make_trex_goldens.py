#!/usr/bin/env python3
"""T-REX goldens: a direct torch transcription of DESIGN.md 1.2 on a synth-model.

The atmoe binary writes a synth-model and two synth T-REX bundles in the released
checkpoint format (rank1_flex with a router mapper and the intuition from the pooled
hidden state of a base layer; rank1 with the intuition from a request embedding). This
script reads those files with safetensors/json only and computes, in float64 with
transformers' LlamaForCausalLM and forward hooks on the adapted Linear modules:

    u = A x;  p = softmax(W_r x);  w' = sigmoid(100 w)
    g = 32 w' p + 4 (1 - w') s;    G = reshape(g, r1, r2)  (rank1: diag)
    y += sigmoid(100 gamma) * B (G^T u)

with s = M (C e) or C e, e the L2-normalised embedding. Logits of every position are
stored with their relative L2 change from the base model's (the experts must move them),
and FNV-1a-64 hashes of the generated files (tests/parity/test_trex_parity.cpp
rebuilds them with the same options and checks the hashes first).

Usage: make_trex_goldens.py ATMOE_BINARY   (needs torch, transformers, safetensors)
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import LlamaForCausalLM

MODEL_ARGS = ["--seed", "31", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
              "--ffn", "96", "--vocab", "320"]
CASES = {
    "flex_mapper_hidden": ["--method", "t-rex", "--trex-mode", "rank1_flex", "--rank", "4,3", "--router-mapping",
                           "--intuition", "hidden_state", "--intuition-layer", "0", "--seed", "12", "--b-std", "0.1"],
    "rank1_embedding": ["--method", "t-rex", "--trex-mode", "rank1", "--rank", "6", "--intuition", "embedding",
                        "--embedding-dim", "24", "--targets", "q,v,gate,down", "--seed", "13", "--b-std", "0.1"],
}
TOKENS = [5, 77, 300, 12, 9, 250, 31, 31, 140, 2, 64, 199]
EMBEDDING = [float(np.sin(0.7 * i + 0.3)) for i in range(24)]
PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def fnv1a64(path):
    h = 0xcbf29ce484222325
    with open(path, "rb") as f:
        for b in f.read():
            h ^= b
            h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def trex_logits(mdir, bdir, ids):
    man = json.load(open(os.path.join(bdir, "atmoe.json")))
    tr = man["t_rex"]
    adir = os.path.join(bdir, tr["adapter"])
    ext = json.load(open(os.path.join(adir, "global_external_config.json")))
    cfg = json.load(open(os.path.join(adir, "adapter_config.json")))
    w = {k: torch.from_numpy(v).double() for k, v in load_file(os.path.join(adir, "adapter_model.safetensors")).items()}
    C = torch.from_numpy(load_file(os.path.join(bdir, tr["centroids"]))["centroids"]).double()
    model = LlamaForCausalLM.from_pretrained(mdir, torch_dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        if tr["intuition"]["source"] == "hidden_state":
            hs = model(ids, output_hidden_states=True).hidden_states[tr["intuition"]["layer"] + 1][0]
            e = hs.mean(dim=0)
        else:
            e = torch.tensor(EMBEDDING, dtype=torch.float64)
        e = e / torch.linalg.norm(e)
        ce = C @ e
        mode = ext["moe_mode"]
        r = cfg["r"]
        if mode == "rank1":
            r1 = r2 = E = r
        else:
            r1, r2 = ext["rank1_flex_rank_allocation"]
            E = r1 * r2
        hooks = []
        for name, mod in model.named_modules():
            leaf = name.split(".")[-1]
            if leaf not in PARENTS:
                continue
            p = "base_model.model." + name
            if p + ".lora_A.weight" not in w:
                continue
            A, B, Wr = w[p + ".lora_A.weight"], w[p + ".lora_B.weight"], w[p + ".router.weight"]
            om = torch.sigmoid(100 * w[p + ".omg.modules_to_save.default.weight"].flatten()[0])
            gate = torch.sigmoid(100 * w[p + ".binary_main_gate_weight.modules_to_save.default.weight"].flatten()[0])
            s = w[p + ".rank1_flex_mapper.weight"] @ ce if ext.get("router_mapping") else ce

            def hook(m, inp, out, A=A, B=B, Wr=Wr, om=om, gate=gate, s=s):
                x = inp[0]
                u = x @ A.T                                   # [b, t, r1]
                pr = torch.softmax(x @ Wr.T, dim=-1)          # [b, t, E]
                g = 32 * om * pr + 4 * (1 - om) * s
                if mode == "rank1":
                    v = g * u
                else:
                    G = g.reshape(*g.shape[:-1], r1, r2)
                    v = torch.einsum("bti,btij->btj", u, G)
                return out + gate * (v @ B.T)
            hooks.append(mod.register_forward_hook(hook))
        logits = model(ids).logits[0]
        plain = None
        for h in hooks:
            h.remove()
        plain = model(ids).logits[0]
    return logits, plain


def main():
    atmoe = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    work = tempfile.mkdtemp(prefix="atmoe_trex_")
    mdir = os.path.join(work, "model")
    subprocess.run([atmoe, "synth-model", "--out", mdir] + MODEL_ARGS, check=True)
    ids = torch.tensor([TOKENS])
    out = {"generator": "tests/parity/make_trex_goldens.py", "synth_model_args": MODEL_ARGS, "tokens": TOKENS,
           "embedding": EMBEDDING, "reference": f"torch {torch.__version__}, float64, eager attention, forward hooks",
           "fnv1a64": {"model/model.safetensors": fnv1a64(os.path.join(mdir, "model.safetensors"))}, "cases": {}}
    for name, args in CASES.items():
        bdir = os.path.join(work, name)
        subprocess.run([atmoe, "synth-bundle", "--base", mdir, "--out", bdir] + args, check=True)
        for rel in ["trex/adapter_model.safetensors", "centroids.safetensors"]:
            out["fnv1a64"][f"{name}/{rel}"] = fnv1a64(os.path.join(bdir, rel))
        logits, plain = trex_logits(mdir, bdir, ids)
        rel_change = float(torch.linalg.norm(logits - plain) / torch.linalg.norm(plain))
        print(f"{name}: experts change the logits by {rel_change:.3g} (relative L2)")
        # The test checks atmoe's own change against this one: parity within 1e-4 would be
        # vacuous if the experts did not move the logits.
        assert rel_change > 1e-2, f"{name}: the experts barely change the logits ({rel_change:.3g})"
        out["cases"][name] = {"synth_bundle_args": args, "logits": logits.flatten().tolist(), "rel_change": rel_change}
    with open(os.path.join(here, "goldens", "trex_synth.json"), "w") as f:
        json.dump(out, f)
    print("wrote goldens/trex_synth.json")


if __name__ == "__main__":
    main()
