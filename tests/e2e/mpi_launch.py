#!/usr/bin/env python3
"""`mpirun -n N atmoe ...` end to end (ctest e2e_mpi, label mpi): the real binary under the
real launcher, on a synth model and bundle.

  - N = 2, 3 (shared memory) and N = 3 over TCP print exactly the single-process text
    (greedy), and only rank 0 prints;
  - bad input ends every rank with one line and exit 2: a bad flag, too many ranks, a bad
    placement file, expert weights that only the workers read (NaN);
  - a worker killed with SIGKILL ends the job with atmoe's line naming the rank, host and
    pid; a worker stopped with SIGSTOP ends it after ATMOE_WORKER_TIMEOUT naming the rank
    and host; SIGTERM to mpirun (scancel, a time limit) ends every rank; never a hang,
    never a leftover process.
Usage: mpi_launch.py ATMOE WORKDIR
"""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

ATMOE, WORK = os.path.abspath(sys.argv[1]), sys.argv[2]
# E2E_MPI_LAUNCH_RUN tags this run's processes (mpirun passes it to every rank), so that the
# leftover and rank checks see only them, not an atmoe someone else runs on the machine.
RUN_TAG = f"mpi_launch-{os.getpid()}-{time.time_ns()}"
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", ATMOE_THREADS="1",
           E2E_MPI_LAUNCH_RUN=RUN_TAG)
MPIRUN = ["mpirun", "--oversubscribe", "--bind-to", "none"]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def run(args, env=None, timeout=120, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, env=env or ENV, timeout=timeout, cwd=cwd)


def ours(pid):
    """True when the process was started by this run (its environment holds RUN_TAG)."""
    try:
        return f"E2E_MPI_LAUNCH_RUN={RUN_TAG}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return False


def leftovers():
    out = subprocess.run(["pgrep", "-f", "^" + re.escape(ATMOE) + " "], capture_output=True, text=True).stdout.split()
    return [p for p in out if p.strip() and ours(p)]


def rank_of(pid):
    """The MPI rank of an atmoe process under mpirun (OMPI_COMM_WORLD_RANK), or None."""
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
            return int(kv.split(b"=", 1)[1])
    return None


def wait_no_leftovers(what, limit=10.0):
    t0 = time.time()
    while leftovers() and time.time() - t0 < limit:
        time.sleep(0.2)
    left = leftovers()
    check(not left, f"{what}: no atmoe process left ({left})")
    for p in left:
        try:
            os.kill(int(p), signal.SIGKILL)
        except OSError:
            pass


def error_lines(stderr):
    return [l for l in stderr.splitlines() if l.startswith("atmoe: error:")]


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    model, bundle = os.path.join(WORK, "m"), os.path.join(WORK, "b")
    r = run([ATMOE, "synth-model", "--out", model, "--seed", "3", "--layers", "4", "--hidden", "128", "--heads", "4",
             "--kv-heads", "2", "--ffn", "256", "--vocab", "400"])
    assert r.returncode == 0, r.stderr
    r = run([ATMOE, "synth-bundle", "--base", model, "--out", bundle, "--groups", "4", "--experts-per-group", "2",
             "--rank", "4,8", "--seed", "4", "--general", "--b-std", "0.5"])
    assert r.returncode == 0, r.stderr
    gen = ["generate", "--bundle", bundle, "--prompt", "hello-world", "--prompt", "a longer second prompt",
           "--max-tokens", "24", "--temperature", "0"]
    one = run([ATMOE] + gen)
    assert one.returncode == 0, one.stderr
    off = run([ATMOE] + gen + ["--routing", "off"])
    check(one.stdout != off.stdout, "the experts change the greedy text (a lost delta would show)")

    # The same text from N ranks; only rank 0 prints.
    for n, extra in [(2, []), (3, []), (3, ["--mca", "btl", "self,tcp"]), (5, [])]:
        r = run(MPIRUN + extra + ["-n", str(n), ATMOE] + gen)
        tag = f"mpirun -n {n} {' '.join(extra)}".strip()
        check(r.returncode == 0, f"{tag}: exit 0 ({r.stderr[-300:]})")
        check(r.stdout == one.stdout, f"{tag}: the single-process text, printed once")
    for dtype in ["f32"]:
        a = run([ATMOE] + gen + ["--dtype", dtype, "--top-k-groups", "1"])
        b = run(MPIRUN + ["-n", "4", ATMOE] + gen + ["--dtype", dtype, "--top-k-groups", "1"])
        check(a.returncode == 0 and b.stdout == a.stdout, f"--dtype {dtype} --top-k-groups 1: 4 ranks = 1 process")
    wait_no_leftovers("after the successful runs")

    # atmoe batch on 3 ranks: the same lines (texts, finish reasons) as one process.
    reqs = os.path.join(WORK, "batch_in.jsonl")
    with open(reqs, "w") as f:
        for i, prompt in enumerate(["hello-world", "a longer second prompt", "third"]):
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "b", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                         "routing": {"top_k_groups": 1} if i == 2 else {}}}) + "\n")

    def batch_texts(prefix, out):
        r = run(prefix + [ATMOE, "batch", "--bundle", bundle, "--input", reqs, "--output", out, "--max-running", "1"])
        lines = [json.loads(l) for l in open(out)] if os.path.exists(out) else []
        return r, {l["custom_id"]: (l["response"]["body"]["choices"][0]["text"],
                                    l["response"]["body"]["choices"][0]["finish_reason"]) for l in lines}

    r1, t1 = batch_texts([], os.path.join(WORK, "batch1.jsonl"))
    r3, t3 = batch_texts(MPIRUN + ["-n", "3"], os.path.join(WORK, "batch3.jsonl"))
    check(r1.returncode == 0 and len(t1) == 3, f"batch, 1 process: 3 lines ({r1.stderr[-300:]})")
    check(r3.returncode == 0 and t3 == t1, f"batch under mpirun -n 3: the single-process lines ({r3.stderr[-300:]})")

    # inspect --placement N: the plan, without loading a model.
    r = run([ATMOE, "inspect", bundle, "--placement", "3"])
    check(r.returncode == 0 and "rank 1" in r.stdout and "rank 2" in r.stdout and "MiB" in r.stdout,
          f"inspect --placement 3 prints the plan ({r.stdout.strip()[:200]})")

    # Bad input: one line, exit 2, every rank ends.
    def bad(args, want, what, n=3, env=None):
        t0 = time.time()
        r = run(MPIRUN + ["-n", str(n), ATMOE] + args, env=env)
        lines = error_lines(r.stderr)
        check(r.returncode == 2 and len(lines) == 1 and re.search(want, lines[0]) is not None,
              f"{what}: exit 2 and one line matching /{want}/ (rc {r.returncode}, {lines})")
        check(time.time() - t0 < 30, f"{what}: ends within 30 s")
        check(r.stdout == "", f"{what}: nothing on stdout")
        wait_no_leftovers(what)

    bad(gen + ["--max-tokens", "x"], r"--max-tokens", "a bad flag")
    bad(gen, r"run at most 6 ranks", "7 ranks for 5 groups", n=7)
    pl = os.path.join(WORK, "placement.json")
    for content, want, what in [
        ({"1": ["medicine", "law"], "2": ["nope"]}, r'"nope" is not a group', "placement: unknown group"),
        ({"1": ["medicine", "law", "code"], "2": ["law", "math", "general"]}, r"already placed on rank 1", "placement: twice"),
        ({"1": ["medicine", "law", "code", "math", "general"]}, r"worker rank 2 has no groups", "placement: idle rank"),
        ({"1": ["medicine", "law"], "2": ["code", "general"]}, r'"math" is not placed', "placement: a group left out"),
        ({"1": ["medicine"], "3": ["law"]}, r'key "3": expected a worker rank 1\.\.2', "placement: rank out of range"),
    ]:
        with open(pl, "w") as f:
            json.dump(content, f)
        bad(gen + ["--placement", pl], want, what)
    # Weights only the workers read: a NaN in one expert's lora_B. The coordinator loads the
    # manifest and router only; the worker's failure comes back as one line naming it.
    nan_bundle = os.path.join(WORK, "b_nan")
    shutil.copytree(bundle, nan_bundle, symlinks=True)
    st = os.path.join(nan_bundle, "experts", "law-1", "adapter_model.safetensors")
    data = bytearray(open(st, "rb").read())
    hlen = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + hlen])
    name = next(k for k in header if k.endswith("lora_B.weight"))
    off0 = 8 + hlen + header[name]["data_offsets"][0]
    data[off0:off0 + 4] = struct.pack("<f", float("nan"))
    open(st, "wb").write(bytes(data))
    gen_nan = [a if a != bundle else nan_bundle for a in gen]
    bad(gen_nan, r"rank \d \(host [^)]+\): .*law-1.*NaN", "NaN in an expert a worker loads")

    # A worker killed with SIGKILL mid-run: atmoe's line names it; the job ends.
    long_gen = ["generate", "--bundle", bundle, "--temperature", "0", "--ignore-eos", "--max-tokens", "480"] + \
               sum([["--prompt", p] for p in "abcdefghijklmnopqrstuvwxyzABCDEF"], [])

    def fault(sig, want, what, env=None, limit=20.0):
        # Rank 0 logs "rank N ... holds ..." for each worker once it has loaded (info level):
        # the fault comes after both, mid-run, not during loading (a machine under load
        # can take seconds to load).
        p = subprocess.Popen(MPIRUN + ["-n", "3", ATMOE] + long_gen, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=dict(env or ENV, ATMOE_LOG_LEVEL="info"))
        err_lines, ready = [], threading.Event()

        def drain():
            for l in p.stderr:
                err_lines.append(l)
                if sum(" holds " in x for x in err_lines) >= 2:
                    ready.set()

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        check(ready.wait(60), f"{what}: both workers loaded")
        time.sleep(0.5)
        pids = sorted(int(x) for x in leftovers())
        check(len(pids) == 3, f"{what}: 3 ranks running ({pids})")
        # A worker: the rank read from its environment (pid order need not follow rank order).
        victim = next((q for q in pids if rank_of(q) not in (None, 0)), pids[-1]) if sig != signal.SIGTERM else p.pid
        t0 = time.time()
        os.kill(victim, sig)
        try:
            p.wait(timeout=limit + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            check(False, f"{what}: the job hung")
        reader.join(10)
        err = "".join(err_lines)
        dt = time.time() - t0
        check(p.returncode != 0, f"{what}: non-zero exit ({p.returncode})")
        check(dt < limit, f"{what}: ended in {dt:.1f} s (< {limit:g})")
        lines = error_lines(err)
        if want:
            check(any(re.search(want, l) for l in lines), f"{what}: atmoe's line /{want}/ ({lines})")
        if sig == signal.SIGSTOP:
            try:
                os.kill(victim, signal.SIGCONT)
            except OSError:
                pass
        wait_no_leftovers(what)

    fault(signal.SIGKILL, r"worker rank \d \(host [^,]+, pid \d+\) is gone", "kill -9 of a worker")
    fault(signal.SIGSTOP, r"rank \d \(host [^)]+\) did not answer within 3 s", "kill -STOP of a worker",
          env=dict(ENV, ATMOE_WORKER_TIMEOUT="3"))
    # mpirun itself told to stop (Slurm's scancel, a batch system's time limit): it ends every
    # rank; its own banner says why.
    fault(signal.SIGTERM, None, "SIGTERM to mpirun")

    if failures:
        print(f"{len(failures)} failed:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("all passed")


if __name__ == "__main__":
    main()
