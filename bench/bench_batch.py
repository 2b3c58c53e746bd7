#!/usr/bin/env python3
"""Batch-job throughput: the same OpenAI Batch JSONL of --requests requests (mixed routing
over the bundle: the routed mixture, top-1 group, a pinned group, one expert by name, the
base) run by `atmoe batch` in one process and under `mpirun -n N` (rank 0 + N-1 workers),
each from an empty output. Records requests/s and generated tokens/s, and checks that every
run wrote one 200 line per request with the same greedy texts.

  bench_batch.py --bundle DIR --requests 1000 --max-tokens 16 --ranks 1 3 --out bench/results/batch.json
"""
import argparse
import json
import os
import subprocess
import sys
import time

from machine import describe

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atmoe", default=os.path.join(ROOT, "build/apps/atmoe"))
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--work", default="/tmp/atmoe_bench_batch")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    man = json.load(open(os.path.join(a.bundle, "atmoe.json")))
    bid = os.path.basename(os.path.normpath(a.bundle))
    groups = [g["name"] for g in man["groups"]]
    expert = man["groups"][0]["experts"][0]["name"]
    base = os.path.basename(man["base_model"])
    base = base[:-5] if base.endswith(".gguf") else base
    variants = [{"model": bid}, {"model": bid, "routing": {"top_k_groups": 1}},
                {"model": bid, "routing": {"pin": {groups[-1]: 1.0}}}, {"model": expert}, {"model": base}]
    words = "the of a to in is you that it he was for on are as with his they at be this from".split()
    inp = os.path.join(a.work, "in.jsonl")
    with open(inp, "w") as f:
        for i in range(a.requests):
            prompt = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(8 + i % 24))
            body = {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True}
            body.update(variants[i % len(variants)])
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    runs, texts = [], {}
    for n in a.ranks:
        out = os.path.join(a.work, f"out_N{n}.jsonl")
        if os.path.exists(out):
            os.remove(out)
        cmd = [a.atmoe, "batch", "--bundle", a.bundle, "--input", inp, "--output", out,
               "--max-running", str(a.max_running)]
        if n > 1:
            cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none"] + cmd
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"N={n}: exit {r.returncode}: {r.stderr[-800:]}")
        lines = [json.loads(l) for l in open(out)]
        ok = [l for l in lines if l["response"] and l["response"]["status_code"] == 200]
        toks = sum(l["response"]["body"]["usage"]["completion_tokens"] for l in ok)
        texts[n] = {l["custom_id"]: l["response"]["body"]["choices"][0]["text"] for l in ok}
        summary = [l for l in r.stderr.splitlines() if "requests in" in l]
        runs.append({"ranks": n, "wall_s": wall, "requests": len(lines), "ok": len(ok),
                     "requests_per_s": len(ok) / wall, "completion_tokens": toks, "tokens_per_s": toks / wall,
                     "summary": summary[-1] if summary else ""})
        print(json.dumps(runs[-1]), flush=True)
    first = texts[a.ranks[0]]
    same = {n: sum(first[k] == t.get(k) for k in first) for n, t in texts.items()}
    res = {"machine": describe(), "bundle": a.bundle, "requests": a.requests, "max_tokens": a.max_tokens,
           "max_running": a.max_running, "variants": variants, "runs": runs,
           "texts_equal_to_first_run": same, "threads_env": os.environ.get("ATMOE_THREADS", "")}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
