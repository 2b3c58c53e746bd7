#!/usr/bin/env python3
"""Distributed experts on SmolLM2-135M-Instruct: decode tokens/s and the per-step split
(rank 0's route / post / exposed wait, the workers' compute) for E experts x N ranks.

Layouts: "fixed" (default): E grows as more groups of 4 rank-8 experts on all seven
modules (G = E / 4), so a request routed top-1 over groups keeps one group (4 experts)
active whatever E is. "wide": 4 groups of E / 4 experts, so the active set grows with E.
With top-1 routing, atmoe bench --spread-groups biases sequence b to group b mod G: a
batch of 16 spreads uniformly over the groups. Each configuration is one
`mpirun -n N atmoe bench --bundle ...` (N = 1: the plain process): inside it, base-only
and experts decode steps are paired (alternating, each timed; runs before 2026-12-07
interleaved them rep by rep) and the medians are kept with their range (atmoe bench). Since
the pairing, rank 0's peak RSS includes both sets of KV caches. Bytes moved per token (data plane, both ways) and each rank's peak RSS come from
the same run. "bytes floor": the base's measured step plus the active experts' bf16 bytes
at the bandwidth measured in the same run; the ratio says how close the experts come to
costing only their bytes. A benchmark, not a test: numbers depend on the machine
(recorded with it).

Usage: bench_distributed.py --atmoe build/apps/atmoe --model MODEL.gguf
         [--experts 4,16,64,256,1024] [--ranks 1,2,3,4] [--routing top1|dense]
         [--layout fixed|wide] [--tcp] [--out bench/results/X.json]
       bench_distributed.py --report A.json B.json ... [--plot PNG] [--table MD]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time


def cpu_name():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def isa():
    flags = open("/proc/cpuinfo").read()
    return "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "scalar"


def expert_bytes_bf16(bundle):
    """bf16 bytes of each expert: its adapter file holds f32 lora_A/lora_B (synth-bundle)."""
    man = json.load(open(os.path.join(bundle, "atmoe.json")))
    out = []
    for g in man["groups"]:
        for e in g["experts"]:
            d = os.path.join(bundle, e["adapter"])
            out.append(sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")) // 2)
    return out


def active_experts(layout, routing, E, batch):
    """Experts a decode step reads: top-1 over groups with the batch spread over them."""
    if routing == "dense":
        return E
    if layout == "fixed":
        return min(batch, max(1, E // 4)) * 4
    return min(batch, 4) * (E // 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atmoe", default="build/apps/atmoe")
    ap.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--experts", default="4,16,64,256")
    ap.add_argument("--ranks", default="1,2,3,4")
    ap.add_argument("--routing", default="top1", choices=["top1", "dense"])
    ap.add_argument("--tcp", action="store_true", help="--mca btl self,tcp (the transport between nodes)")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "bench-bundles"))
    ap.add_argument("--out", default="bench/results/distributed_cpu_smollm2.json")
    ap.add_argument("--plot", default="")
    ap.add_argument("--layout", default="fixed", choices=["fixed", "wide"])
    ap.add_argument("--progress", default="poll", choices=["poll", "none"], help="ATMOE_MPI_PROGRESS of the runs")
    ap.add_argument("--report", nargs="*", help="merge these result files into --table / --plot; run nothing")
    ap.add_argument("--table", default="")
    a = ap.parse_args()
    if a.report:
        return report(a)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cores = os.cpu_count() or 1
    os.makedirs(a.cache, exist_ok=True)
    rows = []
    for E in [int(x) for x in a.experts.split(",")]:
        G, per = (max(1, E // 4), 4) if a.layout == "fixed" else (4, max(1, E // 4))
        bundle = os.path.join(a.cache, f"smollm2_g{G}x{per}_r8")
        if not os.path.exists(os.path.join(bundle, "atmoe.json")):
            t0 = time.time()
            subprocess.run([a.atmoe, "synth-bundle", "--base", a.model, "--out", bundle, "--groups", str(G),
                            "--experts-per-group", str(per), "--rank", "8", "--seed", "11", "--force"], check=True,
                           capture_output=True)
            print(f"# wrote {bundle} in {time.time() - t0:.0f} s", flush=True)
        eb = expert_bytes_bf16(bundle)
        per_expert = sum(eb) / len(eb)
        for N in [int(x) for x in a.ranks.split(",")]:
            if N > 1 and N - 1 > G:
                print(f"E={E} N={N}: skipped ({G} group(s) for {N - 1} workers)", flush=True)
                continue
            out = os.path.join(a.cache, f"run_E{E}_N{N}.json")
            cmd = [a.atmoe, "bench", "--bundle", bundle, "--model", a.model, "--prompt-tokens", "32",
                   "--decode-tokens", str(a.decode), "--reps", str(a.reps), "--batch", "16", "--json", out]
            if a.routing == "top1":
                cmd += ["--top-k-groups", "1", "--spread-groups"]
            # Threads: cores / ranks on the node (atmoe's default); on oversubscribed nodes one each.
            threads = max(1, cores // N)
            if N > 1:
                mpi = ["mpirun", "-n", str(N), "--oversubscribe", "--bind-to", "none"]
                if a.tcp:
                    mpi += ["--mca", "btl", "self,tcp"]
                cmd = mpi + cmd
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True,
                               env=dict(env, ATMOE_THREADS=str(threads), ATMOE_MPI_PROGRESS=a.progress))
            wall = time.time() - t0
            if r.returncode != 0:
                print(f"E={E} N={N}: failed\n{r.stderr[-2000:]}", flush=True)
                continue
            j = json.load(open(out))
            ws = j.get("worker_stats", [])
            bw = j["bandwidth_gb_s"] * 1e9
            act1, act16 = active_experts(a.layout, a.routing, E, 1), active_experts(a.layout, a.routing, E, 16)
            # Bytes floor: the base's own step plus the active experts' bytes at the measured bandwidth.
            floor_b1 = 1.0 / (1.0 / j["decode_b1_tok_s"] + act1 * per_expert / bw)
            floor_b16 = 16.0 / (16.0 / j["decode_batch_tok_s"] + act16 * per_expert / bw)
            row = {
                "experts": E, "groups": G, "experts_per_group": per, "layout": a.layout, "ranks": N,
                "threads_per_rank": threads, "routing": a.routing,
                "transport": "tcp" if a.tcp else "shm", "progress": a.progress, "wall_s": wall,
                "active_experts_b1": act1, "active_experts_b16": act16, "expert_bytes_bf16": per_expert,
                "bandwidth_gb_s": j["bandwidth_gb_s"],
                "bytes_floor_b1": floor_b1, "bytes_floor_b16": floor_b16,
                "plane_bytes_per_token_b1": j["split_b1"].get("plane_bytes_per_step", 0),
                "plane_bytes_per_token_b16": j["split_batch"].get("plane_bytes_per_step", 0) / 16,
                "base_b1": j["decode_b1_tok_s"], "base_b16": j["decode_batch_tok_s"],
                "experts_b1": j["experts_decode_b1_tok_s"], "experts_b16": j["experts_decode_batch_tok_s"],
                "samples": j["samples"], "split_b1": j["split_b1"], "split_b16": j["split_batch"],
                "rank0_peak_rss_mib": j["peak_rss_mib"],
                "worker_peak_rss_mib": [w.get("peak_rss_kib", 0) / 1024 for w in ws],
                "worker_shard_mib": [w.get("shard_bytes", 0) / 2**20 for w in ws],
                "bytes_sent_to_workers": j.get("bytes_sent_to_workers", []),
            }
            rows.append(row)
            s1, s16 = row["split_b1"], row["split_b16"]
            print(f"E={E:5d} N={N} thr={threads}: b1 {row['experts_b1']:6.1f} tok/s (base {row['base_b1']:6.1f}, "
                  f"floor {floor_b1:6.1f})  b16 {row['experts_b16']:6.1f} (base {row['base_b16']:6.1f}, "
                  f"floor {floor_b16:6.1f})  "
                  f"b1 step {s1['step_ms']:.1f} ms wait {s1['wait_ms']:.2f} post {s1['post_ms']:.2f}  "
                  f"b16 step {s16['step_ms']:.1f} ms wait {s16['wait_ms']:.2f}  "
                  f"rss r0 {row['rank0_peak_rss_mib']:.0f} MiB workers {[round(x) for x in row['worker_peak_rss_mib']]}",
                  flush=True)
    res = {"machine": {"cpu": cpu_name(), "isa": isa(), "cores": cores, "python": platform.python_version()},
           "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"# wrote {a.out}")
    if a.plot or a.table:
        a.report = [a.out]
        report(a)


def variant(r):
    v = f"{r['routing']}, {r['layout']}, {r['transport']}"
    return v + (", no polling" if r.get("progress") == "none" else "")


def report(a):
    runs = [json.load(open(p)) for p in a.report]
    rows = [r for run in runs for r in run["rows"]]
    m = runs[0]["machine"]
    if a.table:
        lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['isa']}; " + "; ".join(sorted({run['date'] for run in runs})),
                 "",
                 "| routing, layout, transport | E | N | thr/rank | b1 tok/s (base) | b1 floor | b16 tok/s (base) | b16 floor "
                 "| b16 vs floor | b1 step ms: route+post / wait / workers | b16 step ms: wait (% step) / workers "
                 "| plane B/token b1, b16 | RSS MiB rank 0; workers |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (variant(r), r["experts"], r["ranks"])):
            s1, s16 = r["split_b1"], r["split_b16"]
            lines.append(
                f"| {variant(r)} | {r['experts']} | {r['ranks']} | {r['threads_per_rank']} "
                f"| {r['experts_b1']:.1f} ({r['base_b1']:.1f}) | {r['bytes_floor_b1']:.1f} "
                f"| {r['experts_b16']:.1f} ({r['base_b16']:.1f}) | {r['bytes_floor_b16']:.1f} "
                f"| {100 * r['experts_b16'] / r['bytes_floor_b16']:.0f}% "
                f"| {s1['step_ms']:.1f}: {s1['route_ms'] + s1['post_ms']:.2f} / {s1['wait_ms']:.2f} / {s1['worker_apply_ms']:.2f} "
                f"| {s16['step_ms']:.1f}: {s16['wait_ms']:.2f} ({100 * s16['wait_ms'] / s16['step_ms']:.0f}%) / {s16['worker_apply_ms']:.2f} "
                f"| {r['plane_bytes_per_token_b1'] / 1e3:.0f} kB, {r['plane_bytes_per_token_b16'] / 1e3:.0f} kB "
                f"| {r['rank0_peak_rss_mib']:.0f}; {', '.join(str(round(x)) for x in r['worker_peak_rss_mib']) or '-'} |")
        with open(a.table, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"# wrote {a.table}")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        variants = sorted({variant(r) for r in rows})
        fig, axes = plt.subplots(len(variants), 2, figsize=(12, 3.8 * len(variants)), squeeze=False)
        for vi, v in enumerate(variants):
            vr = [r for r in rows if variant(r) == v]
            for ax, key, title in [(axes[vi][0], "b1", "batch 1"), (axes[vi][1], "b16", "batch 16")]:
                for N in sorted({r["ranks"] for r in vr}):
                    pts = sorted((r["experts"], r["experts_" + key]) for r in vr if r["ranks"] == N)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"N = {N}")
                one = sorted((r["experts"], r["base_" + key], r["bytes_floor_" + key]) for r in vr if r["ranks"] == 1)
                if one:
                    ax.plot([p[0] for p in one], [p[1] for p in one], "k--", label="base only (N = 1)")
                    ax.plot([p[0] for p in one], [p[2] for p in one], "k:", label="bytes floor (N = 1)")
                ax.set_xscale("log", base=2)
                ax.set_ylim(bottom=0)
                ax.set_xlabel("experts E")
                ax.set_ylabel("decode tokens/s")
                ax.set_title(f"{v}, {title}", fontsize=10)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"SmolLM2-135M + rank-8 experts: {m['cpu']}, {m['cores']} cores ({m['isa']})", fontsize=11)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)
        print(f"# wrote {a.plot}")


if __name__ == "__main__":
    main()
