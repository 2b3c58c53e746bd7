#!/usr/bin/env python3
"""Two atmoe builds on the same machine, interleaved: `atmoe bench --json` of build A, then
build B, `--rounds` times (so drift on a shared machine hits both), for the base model and
optionally a bundle. Prints the medians per build with their ranges and B/A, and writes all
samples as JSON.

Used to show that a refactor keeps the CPU path's speed, e.g. before/after the backend
interface (docs/performance.md):

    bench/compare_builds.py --a /tmp/base/build/apps/atmoe --b build/apps/atmoe \
        --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf --bundle /tmp/b16 --rounds 3 \
        --out bench/results/backend_refactor_cpu_smollm2.json

Standard library only; bench/machine.py records the CPU and ISA.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

KEYS = ["prefill_tok_s", "decode_b1_tok_s", "decode_batch_tok_s", "experts_decode_b1_tok_s",
        "experts_decode_batch_tok_s",
        "experts_b1_extra_time_pct", "experts_batch_extra_time_pct", "experts_b1_step_pct", "experts_batch_step_pct",
        "experts_b1_wait_pct", "experts_batch_wait_pct"]


def derive(j):
    """The bundle runs' cost over the base in the same run: extra time per token (base and
    experts steps paired inside `atmoe bench`; older builds interleaved them rep by rep), the
    median paired step's, and the expert wait as a share of the base step (the wait is
    measured directly, so it moves less with the machine's drift)."""
    for b in ("b1", "batch"):
        base, ex, split = j.get(f"decode_{b}_tok_s"), j.get(f"experts_decode_{b}_tok_s"), j.get(f"split_{b}")
        if base and ex and f"experts_{b}_extra_time_pct" not in j:  # builds before the paired steps
            j[f"experts_{b}_extra_time_pct"] = 100.0 * (base / ex - 1.0)
        if f"experts_{b}_step_ratio_median" in j:  # the median paired step's extra time
            j["paired"] = True
            j[f"experts_{b}_step_pct"] = 100.0 * (j[f"experts_{b}_step_ratio_median"] - 1.0)
        if split and split.get("step_ms"):
            j[f"experts_{b}_wait_pct"] = 100.0 * split["wait_ms"] / (split["step_ms"] - split["wait_ms"])
    return j


def run(binary, args):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        subprocess.run([binary, "bench", *args, "--json", path], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        with open(path) as f:
            return derive(json.load(f))
    finally:
        os.unlink(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="atmoe binary of build A (the baseline)")
    ap.add_argument("--b", required=True, help="atmoe binary of build B")
    ap.add_argument("--model", required=True)
    ap.add_argument("--bundle", default="", help="also bench with this bundle (--bundle, routing flags below)")
    ap.add_argument("--bundle-args", default="", help="extra flags for the bundle runs, e.g. '--top-k-groups 1'")
    ap.add_argument("--bundle-only", action="store_true",
                    help="skip the runs without a bundle (the bundle runs measure the base too, paired)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="atmoe bench --reps per run")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.bundle_only and not a.bundle:
        ap.error("--bundle-only needs --bundle")
    configs = [] if a.bundle_only else [("base", ["--model", a.model])]
    if a.bundle:
        configs.append(("bundle", ["--model", a.model, "--bundle", a.bundle, *a.bundle_args.split()]))
    samples = {c: {"A": [], "B": []} for c, _ in configs}
    for r in range(a.rounds):
        for c, args in configs:
            for side, binary in (("A", a.a), ("B", a.b)):
                j = run(binary, [*args, "--reps", str(a.reps)])
                samples[c][side].append({k: j[k] for k in KEYS + ["paired"] if k in j})
                vals = ", ".join(f"{k} {v:.1f}" for k, v in samples[c][side][-1].items() if k in KEYS)
                print(f"round {r + 1} {c} {side}: {vals}", flush=True)
    if a.bundle and any(s.get("paired", False) for s in samples["bundle"]["A"]) != any(
            s.get("paired", False) for s in samples["bundle"]["B"]):
        print("warning: one build pairs its steps and the other does not: the extra times are measured two ways",
              file=sys.stderr)
    summary = {}
    print(f"\n{'config':<8} {'metric':<28} {'A (median, range)':>26} {'B (median, range)':>26} {'B/A, B-A':>8}")
    for c, _ in configs:
        for k in KEYS:
            va = [s[k] for s in samples[c]["A"] if k in s]
            vb = [s[k] for s in samples[c]["B"] if k in s]
            if not va or not vb:
                continue
            ma, mb = statistics.median(va), statistics.median(vb)
            # Percentages (signed, may be 0) compare by difference, speeds by ratio.
            pct = k.endswith("_pct")
            summary[f"{c}.{k}"] = {"A": ma, "B": mb, **({"diff": mb - ma} if pct else {"ratio": mb / ma})}
            cmp = f"{mb - ma:>+6.1f}" if pct else f"{mb / ma:>6.3f}"
            print(f"{c:<8} {k:<28} {ma:>10.1f} ({min(va):.1f}-{max(va):.1f}) {mb:>10.1f} ({min(vb):.1f}-{max(vb):.1f}) "
                  f"{cmp}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"machine": machine.describe(), "a": a.a, "b": a.b, "model": a.model, "bundle": a.bundle,
                       "bundle_args": a.bundle_args, "rounds": a.rounds, "reps": a.reps, "summary": summary,
                       "samples": samples}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
