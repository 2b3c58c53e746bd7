#!/usr/bin/env python3
"""Check that atmoe serves a trained expert exactly as PEFT does.

For a few held-out prompts of the expert's task, compares the greedy answer of
  PEFT:  the GGUF base dequantised by transformers + the adapter (float32)
  atmoe: atmoe generate --bundle DIR --adapter NAME --chat --temperature 0 --dtype f32
and the base alone (--routing off vs the plain model). Prints one line per prompt and
exits 1 on any difference.

    python check_atmoe.py --bundle bundle --expert uppercase -n 5
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_experts as T  # noqa: E402


def atmoe_answer(atmoe, bundle, prompt, max_new, adapter):
    cmd = [atmoe, "generate", "--bundle", bundle, "--chat", "--prompt", prompt, "--temperature", "0",
           "--max-tokens", str(max_new), "--dtype", "f32"]
    cmd += ["--adapter", adapter] if adapter else ["--routing", "off"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out[:-1] if out.endswith("\n") else out  # atmoe ends its output with a newline


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=os.path.join(HERE, "bundle"))
    ap.add_argument("--expert", required=True)
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--atmoe", default=os.path.join(HERE, "..", "..", "build", "apps", "atmoe"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from peft import PeftModel
    with open(os.path.join(args.bundle, "atmoe.json")) as f:
        man = json.load(f)
    adir = None
    for g in man["groups"]:
        for e in g["experts"]:
            if e["name"] == args.expert:
                adir = os.path.join(args.bundle, e["adapter"])
    if man.get("general_expert", {}).get("name") == args.expert:
        adir = os.path.join(args.bundle, man["general_expert"]["adapter"])
    if adir is None:
        sys.exit(f"{args.bundle}: no expert '{args.expert}'")
    task = args.expert if args.expert in T.TASKS else T.TASKS[0]
    items = T.read_jsonl(os.path.join(args.data, "test", task + ".jsonl"))[:args.n]
    tok, base = T.load_base(os.path.join(args.bundle, man["base_model"]), torch, args.threads)
    enc = T.Encoder(tok)
    gen_args = argparse.Namespace(eval_batch=1, max_new_tokens=args.max_new_tokens)
    prompts = [it["messages"][-1]["content"] for it in items]
    ids = [enc.prompt_ids(it["messages"]) for it in items]
    bad = 0
    for label, model, adapter in (("base", base, None), (args.expert, None, args.expert)):
        if model is None:
            model = PeftModel.from_pretrained(base, adir)
            model.eval()
        hf = T.generate(model, enc, ids, gen_args, torch)
        for p, h in zip(prompts, hf):
            a = atmoe_answer(args.atmoe, args.bundle, p, args.max_new_tokens, adapter)
            same = a == h
            bad += not same
            print(f"{'same' if same else 'DIFF'} [{label}] {p!r}\n     peft : {h!r}\n     atmoe: {a!r}", flush=True)
    print("all equal" if not bad else f"{bad} differences")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
