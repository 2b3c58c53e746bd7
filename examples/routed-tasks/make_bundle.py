#!/usr/bin/env python3
"""Lay out the routed-tasks bundle and fit its router.

    bundle/
      atmoe.json                 version 1, method at-moe, 3 groups x 2 experts + general
      base.gguf -> ../../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf   (relative symlink)
      router.safetensors         written by `atmoe fit-router` (a zero router before that)
      router.fit.json, .svg      fit-router's report (held-out routing accuracy, lambda search)
      experts/<name>/            adapter_config.json + adapter_model.safetensors (bf16)

Steps: copy the PEFT adapters from --adapters, link the base, write atmoe.json and a
placeholder router (all zeros: uniform weights, so the bundle loads before the router is
fitted), then run
    atmoe fit-router --bundle bundle --data data/route_train.jsonl --test data/route_test.jsonl
which replaces router.safetensors and rewrites atmoe.json's "lambda" with the value it
chooses on its dev lines (docs/fitting.md). --only EXPERT[,EXPERT] makes a smaller bundle
without the general expert and without fitting (the groups keep only those experts; empty
groups are dropped), e.g. to check one adapter with
`atmoe generate --bundle DIR --adapter NAME` or check_atmoe.py. Standard library only.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BASE = os.path.join(HERE, "..", "..", ".cache", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_ATMOE = os.path.join(HERE, "..", "..", "build", "apps", "atmoe")
GROUPS = [
    ("text", ["reverse-words", "uppercase"]),
    ("label", ["category", "parity"]),
    ("format", ["date-dmy", "kv-json"]),
]


def write_safetensors_f32(path, tensors):
    """tensors: {name: (shape, flat list of floats)} -> a safetensors file of F32 tensors."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        shape, vals = tensors[name]
        b = struct.pack(f"<{len(vals)}f", *vals)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=os.path.join(HERE, "adapters"))
    ap.add_argument("--out", default=os.path.join(HERE, "bundle"))
    ap.add_argument("--base", default=DEFAULT_BASE, help="base GGUF; the bundle gets a relative symlink to it")
    ap.add_argument("--only", default="", help="comma-separated experts to keep (default: all six)")
    ap.add_argument("--no-general", action="store_true", help="leave the general expert out")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.8,
                    help="weight of the routed mixture against the general expert (0.8: general gets 0.2)")
    ap.add_argument("--layers", type=int, default=30, help="base layers (SmolLM2-135M: 30)")
    ap.add_argument("--hidden", type=int, default=576, help="base hidden size (SmolLM2-135M: 576)")
    ap.add_argument("--atmoe", default=DEFAULT_ATMOE)
    ap.add_argument("--data", default=os.path.join(HERE, "data", "route_train.jsonl"))
    ap.add_argument("--test", default=os.path.join(HERE, "data", "route_test.jsonl"),
                    help="held-out templates: fit-router's report is on these, never fitted on")
    ap.add_argument("--lambda-grid", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--no-fit", action="store_true", help="keep the zero router (do not run atmoe fit-router)")
    args = ap.parse_args()

    only = set(e for e in args.only.split(",") if e)
    groups = [(g, [e for e in es if not only or e in only]) for g, es in GROUPS]
    groups = [(g, es) for g, es in groups if es]
    if not groups:
        sys.exit("--only names none of the experts")
    general = not args.no_general and not only

    out = args.out
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "experts"))
    names = [e for _, es in groups for e in es] + (["general"] if general else [])
    for e in names:
        src, dst = os.path.join(args.adapters, e), os.path.join(out, "experts", e)
        os.makedirs(dst)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            if not os.path.isfile(os.path.join(src, f)):
                sys.exit(f"{src}: missing {f} (train it first: train_experts.py --experts {e})")
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    os.symlink(os.path.relpath(os.path.abspath(args.base), os.path.abspath(out)), os.path.join(out, "base.gguf"))

    manifest = {
        "format": "atmoe-bundle",
        "version": 1,
        "base_model": "base.gguf",
        "method": "at-moe",
        "groups": [{"name": g, "experts": [{"name": e, "adapter": f"experts/{e}"} for e in es]} for g, es in groups],
    }
    if general:
        manifest["general_expert"] = {"name": "general", "adapter": "experts/general"}
        manifest["lambda"] = args.lam
    manifest["router"] = {"file": "router.safetensors", "input": "per_request", "tau_group": 1.0, "tau_expert": 1.0}
    with open(os.path.join(out, "atmoe.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")

    G, E, d = len(groups), sum(len(es) for _, es in groups), args.hidden
    zero = {}
    for l in range(args.layers):
        zero[f"layers.{l}.group_gate.weight"] = ((G, d), [0.0] * (G * d))
        zero[f"layers.{l}.expert_gate.weight"] = ((E, d), [0.0] * (E * d))
    write_safetensors_f32(os.path.join(out, "router.safetensors"), zero)
    print(f"wrote {out}: {G} groups, {E} experts{' + general' if general else ''}, zero router")

    if args.no_fit or only:  # route_train.jsonl names all six experts: fit-router would refuse it
        return
    cmd = [args.atmoe, "fit-router", "--bundle", out, "--data", args.data, "--test", args.test]
    if general:
        cmd += ["--lambda-grid", args.lambda_grid]
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"atmoe fit-router failed (exit code {rc}); the bundle keeps the zero router")


if __name__ == "__main__":
    main()
