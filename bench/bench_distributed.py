#!/usr/bin/env python3
"""Distributed experts on SmolLM2-135M-Instruct: decode tokens/s and the per-step split
(rank 0's route / post / exposed wait, the workers' compute) for E experts x N ranks.

E grows as more groups of 4 rank-8 experts on all seven modules (G = E / 4), so a request
routed top-1 over groups keeps one group (4 experts) active whatever E is. Each
configuration is one `mpirun -n N atmoe bench --bundle ...` (N = 1: the plain process):
inside it, base-only and experts decode interleave rep by rep and the medians are kept
with their range (atmoe bench). Bytes moved per token and each rank's peak RSS come from
the same run. A benchmark, not a test: numbers depend on the machine (recorded with it).

Usage: bench_distributed.py --atmoe build/apps/atmoe --model MODEL.gguf
         [--experts 4,16,64,256] [--ranks 1,2,3,4] [--routing top1|dense] [--tcp]
         [--out bench/results/distributed_cpu_smollm2.json] [--plot docs/distributed_cpu_smollm2.png]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atmoe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--experts", default="4,16,64,256")
    ap.add_argument("--ranks", default="1,2,3,4")
    ap.add_argument("--routing", default="top1", choices=["top1", "dense"])
    ap.add_argument("--tcp", action="store_true", help="--mca btl self,tcp (the transport between nodes)")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "bench-bundles"))
    ap.add_argument("--out", default="bench/results/distributed_cpu_smollm2.json")
    ap.add_argument("--plot", default="")
    a = ap.parse_args()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cores = os.cpu_count() or 1
    os.makedirs(a.cache, exist_ok=True)
    rows = []
    for E in [int(x) for x in a.experts.split(",")]:
        G = max(1, E // 4)
        bundle = os.path.join(a.cache, f"smollm2_g{G}x4_r8")
        if not os.path.exists(os.path.join(bundle, "atmoe.json")):
            t0 = time.time()
            subprocess.run([a.atmoe, "synth-bundle", "--base", a.model, "--out", bundle, "--groups", str(G),
                            "--experts-per-group", "4", "--rank", "8", "--seed", "11", "--force"], check=True,
                           capture_output=True)
            print(f"# wrote {bundle} in {time.time() - t0:.0f} s", flush=True)
        for N in [int(x) for x in a.ranks.split(",")]:
            if N > 1 and N - 1 > G:
                print(f"E={E} N={N}: skipped ({G} group(s) for {N - 1} workers)", flush=True)
                continue
            out = os.path.join(a.cache, f"run_E{E}_N{N}.json")
            cmd = [a.atmoe, "bench", "--bundle", bundle, "--model", a.model, "--prompt-tokens", "32",
                   "--decode-tokens", str(a.decode), "--reps", str(a.reps), "--batch", "16", "--json", out]
            if a.routing == "top1":
                cmd += ["--top-k-groups", "1"]
            # Threads: cores / ranks on the node (atmoe's default); on oversubscribed nodes one each.
            threads = max(1, cores // N)
            if N > 1:
                mpi = ["mpirun", "-n", str(N), "--oversubscribe", "--bind-to", "none"]
                if a.tcp:
                    mpi += ["--mca", "btl", "self,tcp"]
                cmd = mpi + cmd
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, ATMOE_THREADS=str(threads)))
            wall = time.time() - t0
            if r.returncode != 0:
                print(f"E={E} N={N}: failed\n{r.stderr[-2000:]}", flush=True)
                continue
            j = json.load(open(out))
            ws = j.get("worker_stats", [])
            row = {
                "experts": E, "groups": G, "ranks": N, "threads_per_rank": threads, "routing": a.routing,
                "transport": "tcp" if a.tcp else "shm", "wall_s": wall,
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
            print(f"E={E:5d} N={N} thr={threads}: b1 {row['experts_b1']:6.1f} tok/s (base {row['base_b1']:6.1f})  "
                  f"b16 {row['experts_b16']:6.1f} (base {row['base_b16']:6.1f})  "
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
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, title in [(axes[0], "experts_b1", "batch 1"), (axes[1], "experts_b16", "batch 16")]:
            for N in sorted({r["ranks"] for r in rows}):
                pts = sorted((r["experts"], r[key]) for r in rows if r["ranks"] == N)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"N = {N}")
            base = sorted((r["experts"], r[key.replace("experts", "base")]) for r in rows if r["ranks"] == 1)
            if base:
                ax.plot([p[0] for p in base], [p[1] for p in base], "k--", label="base only (N = 1)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("experts E (groups of 4, rank 8; top-1 group)" if a.routing == "top1" else "experts E (dense)")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"SmolLM2-135M, {title}, {res['machine']['cores']} cores ({res['machine']['isa']})")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"# wrote {a.plot}")


if __name__ == "__main__":
    main()
