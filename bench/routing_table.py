#!/usr/bin/env python3
"""The AT-MoE table: exact-match accuracy of routed LoRA mixtures on held-out prompts.

From a bundle of task experts (examples/routed-tasks) and its labelled data
(route_train.jsonl, route_test.jsonl: "messages", "experts", "completion"), this script
builds three variants of the bundle in --work (symlinks to the same experts and base):

  grouped     the bundle's groups, router fitted per_request      (atmoe fit-router)
  grouped-tok the same groups, router fitted per_token
  grouped-tok-base   the same, fitted on inputs with no expert applied (--features base)
  flat        one group holding every expert, fitted on the same expert-level labels

and runs, with `atmoe batch` (greedy, chat template), every test prompt under:

  base                 routing off
  expert:NAME          each expert alone at weight 1 (vLLM-style LoRA by name)
  uniform              every expert at the same weight
  oracle               pinned to the line's expert(s) (a compound instruction: its two at 0.5)
  fitted               the fitted router of each variant (grouped-tok-base: per_token,
                       fitted with --features base, inputs with no expert applied)
  ... +general         the same with the general expert blended by the fitted lambda
  general              the general expert alone (lambda 0)

Accuracy is exact match of the stripped text. Routing accuracy per layer (heaviest group,
and for the flat router heaviest expert, among the target's heaviest) comes from the
routing traces of the fitted rows. Results go to --out (JSON) and a Markdown table to stdout.

Usage: routing_table.py --atmoe build/apps/atmoe --bundle examples/routed-tasks/bundle
         --train .../route_train.jsonl --test .../route_test.jsonl --out bench/results/X.json
         [--per-task 30] [--max-tokens 32] [--work /tmp/routing_table]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe  # noqa: E402


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def task_of(row):
    return "+".join(sorted(row["experts"]))


def make_variant(src, dst, manifest):
    """A bundle dir whose experts and base are symlinks into `src` and whose manifest is `manifest`."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for name in os.listdir(src):
        if name in ("atmoe.json",) or name.startswith("router"):
            continue
        os.symlink(os.path.realpath(os.path.join(src, name)), os.path.join(dst, name))
    with open(os.path.join(dst, "atmoe.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def run(cmd, **kw):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stderr[-2000:]}")
    return r, time.time() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atmoe", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-task", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/routing_table")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--lambda-grid", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--tokens-per-prompt", type=int, default=8)
    ap.add_argument("--refit", action="store_true", help="refit the grouped router too (default: the bundle's)")
    ap.add_argument("--reuse-fits", action="store_true", help="keep the variants already fitted in --work")
    a = ap.parse_args()
    atmoe = os.path.abspath(a.atmoe)
    man = json.load(open(os.path.join(a.bundle, "atmoe.json")))
    experts = [e["name"] for g in man["groups"] for e in g["experts"]]
    group_of = {e["name"]: g["name"] for g in man["groups"] for e in g["experts"]}
    has_general = "general_expert" in man
    os.makedirs(a.work, exist_ok=True)

    # Test lines: the first --per-task of every task (single and compound).
    test, seen = [], {}
    for row in read_jsonl(a.test):
        t = task_of(row)
        if seen.get(t, 0) < a.per_task:
            seen[t] = seen.get(t, 0) + 1
            test.append(row)
    tasks = sorted(seen, key=lambda t: ("+" in t, t))

    # The three variants, each fitted on the training lines.
    variants = {}
    base = dict(man)
    base["router"] = dict(man["router"], file="router.safetensors", input="per_request")
    variants["grouped"] = base
    variants["grouped-tok"] = dict(base, router=dict(base["router"], input="per_token"))
    variants["grouped-tok-base"] = dict(base, router=dict(base["router"], input="per_token"))  # fit-router --features base
    flat = dict(base, groups=[{"name": "all", "experts": [e for g in man["groups"] for e in g["experts"]]}])
    variants["flat"] = flat
    fit_info = {}
    for name, m in variants.items():
        d = os.path.join(a.work, name)
        if a.reuse_fits and os.path.exists(os.path.join(d, "router.fit.json")):
            rep = json.load(open(os.path.join(d, "router.fit.json")))
            fit_info[name] = {"command": "(reused from an earlier run in --work)",
                              "heldout_group_accuracy_mean": rep["heldout_group_accuracy_mean"],
                              "lambda": rep["lambda"] and rep["lambda"]["chosen"],
                              "seconds_features_fit": rep["seconds"],
                              "layers": [{"layer": l["layer"], "heldout": l.get("heldout")} for l in rep["layers"]]}
            continue
        make_variant(a.bundle, d, m)
        cmd = [atmoe, "fit-router", "--bundle", d, "--data", os.path.abspath(a.train), "--test", os.path.abspath(a.test),
               "--dtype", a.dtype, "--lambda-grid", a.lambda_grid, "--tokens-per-prompt", str(a.tokens_per_prompt)]
        if name.endswith("-base"):
            cmd += ["--features", "base"]
        if name == "grouped" and not a.refit and os.path.exists(os.path.join(a.bundle, "router.fit.json")):
            # The bundle's own router (fitted by make_bundle.py with the same data): reused.
            for f in ("router.safetensors", "router.fit.json"):
                shutil.copyfile(os.path.join(a.bundle, f), os.path.join(d, f))
            if has_general:
                m["lambda"] = man.get("lambda", 1.0)
            with open(os.path.join(d, "atmoe.json"), "w") as f:
                json.dump(m, f, indent=1)
            cmd, secs = ["(the bundle's router)"], 0.0
        else:
            _, secs = run(cmd)
        rep = json.load(open(os.path.join(d, "router.fit.json")))
        fit_info[name] = {"command": " ".join(cmd[1:]), "seconds": round(secs, 1), "seconds_features_fit": rep["seconds"],
                          "heldout_group_accuracy_mean": rep["heldout_group_accuracy_mean"],
                          "lambda": rep["lambda"] and rep["lambda"]["chosen"],
                          "layers": [{"layer": l["layer"], "heldout": l.get("heldout")} for l in rep["layers"]]}
        print(f"fitted {name}: held-out routing accuracy {rep['heldout_group_accuracy_mean']:.3f} ({secs:.0f} s)", flush=True)

    # Requests: (variant, config) -> routing controls per line.
    def lam1():
        return {"lambda": 1} if has_general else {}

    configs = [("grouped", "base", lambda r: {"off": True}, False)]
    configs += [("grouped", f"expert:{e}", (lambda e: lambda r: {"adapter": e})(e), False) for e in experts]
    configs += [("grouped", "uniform", lambda r: dict(pin={e: 1 for e in experts}, **lam1()), False),
                ("grouped", "oracle", lambda r: dict(pin=r["experts"], **lam1()), False)]
    for v in variants:
        configs.append((v, f"fitted {v}", lambda r: lam1(), True))
    if has_general:
        configs += [("grouped", "general", lambda r: {"lambda": 0}, False),
                    ("grouped", "oracle +general", lambda r: {"pin": r["experts"]}, False)]
        for v in variants:
            configs.append((v, f"fitted {v} +general", lambda r: {}, False))

    results = {}
    for v in variants:
        d = os.path.join(a.work, v)
        lines, keys = [], []
        for ci, (vv, cname, ctl, trace) in enumerate(configs):
            if vv != v:
                continue
            for i, row in enumerate(test):
                body = {"model": os.path.basename(d), "messages": row["messages"], "max_tokens": a.max_tokens,
                        "temperature": 0}
                c = ctl(row)
                if c:
                    body["routing"] = c
                if trace:
                    body["routing_trace"] = True
                cid = f"{ci}-{i}"
                keys.append(cid)
                lines.append({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
        inp, out = os.path.join(a.work, f"{v}.in.jsonl"), os.path.join(a.work, f"{v}.out.jsonl")
        with open(inp, "w") as f:
            for l in lines:
                f.write(json.dumps(l) + "\n")
        if os.path.exists(out):
            os.remove(out)
        _, secs = run([atmoe, "batch", "--bundle", d, "--input", inp, "--output", out, "--dtype", a.dtype])
        print(f"{v}: {len(lines)} requests in {secs:.0f} s", flush=True)
        got = {}
        for l in read_jsonl(out):
            assert l["response"] and l["response"]["status_code"] == 200, l
            got[l["custom_id"]] = l["response"]["body"]
        for ci, (vv, cname, ctl, trace) in enumerate(configs):
            if vv != v:
                continue
            per_task = {t: [0, 0] for t in tasks}
            L = None
            layer_ok, layer_n = [], 0
            for i, row in enumerate(test):
                b = got[f"{ci}-{i}"]
                text = b["choices"][0]["message"]["content"]
                ok = text.strip() == row["completion"].strip()
                per_task[task_of(row)][0] += ok
                per_task[task_of(row)][1] += 1
                if trace:
                    layers = b["routing_trace"]["layers"]
                    L = len(layers)
                    if not layer_ok:
                        layer_ok = [0] * L
                    if v == "flat":  # expert-level: heaviest expert among the targets' heaviest
                        tgt = row["experts"]
                        key = "experts"
                    else:
                        tgt = {}
                        for e, w in row["experts"].items():
                            tgt[group_of[e]] = tgt.get(group_of[e], 0) + w
                        key = "groups"
                    top = max(tgt.values())
                    for li, lay in enumerate(layers):
                        w = lay[key]
                        best = max(w, key=w.get)
                        layer_ok[li] += tgt.get(best, 0) >= top - 1e-9
                    layer_n += 1
            n_ok = sum(v2[0] for v2 in per_task.values())
            n = sum(v2[1] for v2 in per_task.values())
            res = {"variant": v, "accuracy": n_ok / n, "n": n,
                   "per_task": {t: per_task[t][0] / per_task[t][1] for t in tasks}}
            if trace:
                res["routing_accuracy_per_layer"] = [x / layer_n for x in layer_ok]
                res["routing_level"] = "expert" if v == "flat" else "group"
            results[cname] = res

    out = {"machine": describe(), "date": time.strftime("%Y-%m-%d"), "bundle": a.bundle, "train": a.train, "test": a.test,
           "per_task": a.per_task, "max_tokens": a.max_tokens, "dtype": a.dtype, "tasks": tasks, "experts": experts,
           "fits": fit_info, "results": results,
           "command": " ".join(sys.argv)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    # Markdown.
    single = [t for t in tasks if "+" not in t]
    comp = [t for t in tasks if "+" in t]
    hdr = "| configuration | all | " + " | ".join(single) + " | compound |"
    print(hdr)
    print("|" + "---|" * (3 + len(single)))
    for cname, r in results.items():
        c = sum(r["per_task"][t] * seen[t] for t in comp) / max(1, sum(seen[t] for t in comp))
        print(f"| {cname} | {r['accuracy']:.2f} | " + " | ".join(f"{r['per_task'][t]:.2f}" for t in single) + f" | {c:.2f} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
