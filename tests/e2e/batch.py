#!/usr/bin/env python3
"""`atmoe batch` end to end (ctest e2e_batch): the real binary on real files, synth model
and bundle.

  - OpenAI Batch API lines in, one line out per input line: chat and completions, routed
    (controls in body.routing), one expert by name, the base alone; greedy texts equal
    `atmoe generate`'s for the same prompt and routing;
  - every bad line becomes one error line naming its line and field, and the job goes on;
  - resume: a planted torn last line is cut and its request rerun; kill -9 and SIGTERM
    mid-run, then a rerun: every custom_id exactly once, no torn line;
  - --shard K/N: the shards partition the input.
Usage: batch.py ATMOE WORKDIR
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ATMOE, WORK = os.path.abspath(sys.argv[1]), sys.argv[2]
ENV = dict(os.environ, ATMOE_THREADS="1")
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def run(args, timeout=300):
    return subprocess.run([ATMOE] + args, capture_output=True, text=True, env=ENV, timeout=timeout)


def read_lines(path):
    with open(path, "rb") as f:
        data = f.read()
    return data, [json.loads(l) for l in data.decode().splitlines() if l.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    model, bundle = os.path.join(WORK, "m"), os.path.join(WORK, "b")
    r = run(["synth-model", "--out", model, "--seed", "3", "--layers", "4", "--hidden", "128", "--heads", "4",
             "--kv-heads", "2", "--ffn", "256", "--vocab", "400"])
    assert r.returncode == 0, r.stderr
    r = run(["synth-bundle", "--base", model, "--out", bundle, "--groups", "3", "--experts-per-group", "2",
             "--rank", "4", "--seed", "4", "--b-std", "0.5"])
    assert r.returncode == 0, r.stderr
    manifest = json.load(open(os.path.join(bundle, "atmoe.json")))
    groups = [g["name"] for g in manifest["groups"]]
    expert = manifest["groups"][1]["experts"][0]["name"]
    # Served names: the bundle's directory, the base model's file (without .gguf) or directory.
    bid = "b"
    base_id = os.path.basename(os.path.normpath(manifest["base_model"]))
    base_id = base_id[:-5] if base_id.endswith(".gguf") else base_id

    def line(cid, body, url="/v1/completions"):
        return {"custom_id": cid, "method": "POST", "url": url, "body": body}

    good = [
        line("c-plain", {"model": bid, "prompt": "hello world", "max_tokens": 10, "temperature": 0}),
        line("c-pin", {"model": bid, "prompt": "hello world", "max_tokens": 10, "temperature": 0,
                       "routing": {"pin": {groups[0]: 1.0}}}),
        line("c-topk", {"model": bid, "prompt": "another prompt here", "max_tokens": 10, "temperature": 0,
                        "routing": {"top_k_groups": 1}}),
        line("c-expert", {"model": expert, "prompt": "hello world", "max_tokens": 10, "temperature": 0}),
        line("c-base", {"model": base_id, "prompt": "hello world", "max_tokens": 10, "temperature": 0}),
        line("c-n2", {"model": bid, "prompt": "hello world", "max_tokens": 10, "temperature": 0, "n": 2,
                      "logprobs": 1}),
        line("chat-1", {"model": bid, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 10,
                        "temperature": 0}, "/v1/chat/completions"),
        line("c-sampled", {"model": bid, "prompt": "seeded", "max_tokens": 10, "temperature": 0.9, "seed": 7}),
    ]
    bad = [
        ("{not json", "not a JSON object"),
        (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "custom_id"),
        (json.dumps(line("c-plain", {"model": bid, "prompt": "dup"})), "duplicate of line 1"),
        (json.dumps(line("bad-url", {"model": bid, "prompt": "x"}, "/v1/embeddings")), "url"),
        (json.dumps(line("bad-max", {"model": bid, "prompt": "x", "max_tokens": -5})), "body.max_tokens"),
        (json.dumps(line("bad-temp", {"model": bid, "prompt": "x", "temperature": "hot"})), "body.temperature"),
        (json.dumps(line("bad-top-p", {"model": bid, "prompt": "x", "top_p": 2})), "body.top_p"),
        (json.dumps(line("bad-model", {"model": "nope", "prompt": "x"})), "body.model"),
        (json.dumps(line("bad-group", {"model": bid, "prompt": "x", "routing": {"pin": {"nope": 1}}})), "nope"),
        (json.dumps(line("bad-format", {"model": bid, "prompt": "x", "response_format": {"type": "json_object"}})),
         "body.response_format"),
        (json.dumps(line("bad-ctl", {"model": bid, "prompt": "x", "routing": {"bogus": 1}})), "body.routing.bogus"),
    ]
    inp, out = os.path.join(WORK, "in.jsonl"), os.path.join(WORK, "out.jsonl")
    rows = [good[0]] + [b[0] for b in bad[:3]] + [""] + good[1:] + [b[0] for b in bad[3:]]
    write_jsonl(inp, rows)
    # --max-running 1: each request alone, with generate's shapes (the comparison below is exact).
    r = run(["batch", "--bundle", bundle, "--input", inp, "--output", out, "--max-running", "1"])
    check(r.returncode == 0, f"batch: exit 0 with bad lines in the input ({r.stderr[-400:]})")
    data, got = read_lines(out)
    check(data.endswith(b"\n"), "the output ends with a whole line")
    check(len(got) == len(good) + len(bad), f"one output line per non-blank input line ({len(got)})")
    by_id = {g["custom_id"]: g for g in got if g["custom_id"]}
    for g in good:
        o = by_id.get(g["custom_id"])
        ok = o is not None and o["response"]["status_code"] == 200 and o["error"] is None
        check(ok, f"{g['custom_id']}: a 200 response")
        if ok:
            body = o["response"]["body"]
            n = g["body"].get("n", 1)
            check(body["usage"]["completion_tokens"] == 10 * n or body["choices"][0]["finish_reason"] == "stop",
                  f"{g['custom_id']}: 10 tokens or a stop")
            check(body["model"] == g["body"]["model"], f"{g['custom_id']}: model echoed")
    errs = [g for g in got if g.get("error")]
    check(len(errs) == len(bad), f"{len(bad)} error lines ({len(errs)})")
    for (text, want), e in zip(bad, errs):
        msg = e["error"]["message"]
        check(want in msg and msg.startswith("line "), f"error line names '{want}' and its line: {msg[:120]}")
        st = e["response"]["status_code"]
        check(st in (400, 404) and e["response"]["body"]["error"]["message"] == msg,
              f"error line: HTTP status {st} and OpenAI's error body")
    check(errs[-4]["error"]["code"] == "model_not_found", "an unknown model has code model_not_found")
    check("routing" in by_id["c-plain"]["response"]["body"]["atmoe"], "routed lines carry mean group weights")

    # Greedy texts equal generate's for the same prompt and routing.
    def gen(*extra):
        g = run(["generate", "--bundle", bundle, "--prompt", "hello world", "--max-tokens", "10",
                 "--temperature", "0"] + list(extra))
        assert g.returncode == 0, g.stderr
        return g.stdout[:-1]

    text = lambda cid: by_id[cid]["response"]["body"]["choices"][0]["text"]
    check(text("c-plain") == gen(), "routed completion = generate --bundle")
    check(text("c-pin") == gen("--pin", f"{groups[0]}=1"), "routing.pin = generate --pin")
    check(text("c-expert") == gen("--adapter", expert), "model=<expert> = generate --adapter")
    check(text("c-base") == gen("--routing", "off"), "model=<base> = generate --routing off")
    check(text("c-plain") != text("c-base"), "the experts change the text")
    n2 = by_id["c-n2"]["response"]["body"]["choices"]
    check(len(n2) == 2 and all(c["text"] == text("c-plain") for c in n2) and
          all(len(c["logprobs"]["tokens"]) == 10 for c in n2), "n=2 with logprobs: two greedy choices, 10 logprobs each")

    # Resume from a planted torn line: the last two whole lines go, half of one is left.
    full = data
    lines = full.split(b"\n")[:-1]
    torn = b"\n".join(lines[:-2]) + b"\n" + lines[-2][: len(lines[-2]) // 2]
    with open(out, "wb") as f:
        f.write(torn)
    r = run(["batch", "--bundle", bundle, "--input", inp, "--output", out, "--max-running", "1"])
    data2, got2 = read_lines(out)
    ids = [g["custom_id"] or g["atmoe"]["line"] for g in got2]
    check(r.returncode == 0 and "torn" in r.stderr, f"resume: exit 0 and a torn line reported ({r.stderr[-300:]})")
    check(sorted(map(str, ids)) == sorted(map(str, [g["custom_id"] or g["atmoe"]["line"] for g in got])),
          "resume after a torn line: every line exactly once")
    check(all(l.strip() for l in data2.decode().split("\n")[:-1]), "no torn line left")
    by_id2 = {g["custom_id"]: g for g in got2 if g["custom_id"]}
    check(all(by_id2[g["custom_id"]]["response"]["body"]["choices"] == by_id[g["custom_id"]]["response"]["body"]["choices"]
              for g in good if g["custom_id"] != "c-sampled"), "resumed lines: the same greedy texts")
    # A file that is not a batch output is refused untouched.
    alien = os.path.join(WORK, "alien.jsonl")
    with open(alien, "w") as f:
        f.write('{"hello": 1}\n{"partial')
    r = run(["batch", "--bundle", bundle, "--input", inp, "--output", alien])
    check(r.returncode == 2 and "not a batch output" in r.stderr and open(alien).read() == '{"hello": 1}\n{"partial',
          "resume into a foreign file: refused, file untouched")

    # A torn tail of one byte (a write cut short) is still ours: cut, and its request rerun.
    with open(out, "wb") as f:
        f.write(data2 + b"{")
    r = run(["batch", "--bundle", bundle, "--input", inp, "--output", out, "--max-running", "1"])
    _, got3 = read_lines(out)
    check(r.returncode == 0 and len(got3) == len(got2), f"a 1-byte torn tail is cut and resumed ({r.stderr[-200:]})")
    # Another job's output (ids not in this input) is refused untouched.
    other = os.path.join(WORK, "other.jsonl")
    with open(other, "w") as f:
        f.write(json.dumps({"custom_id": "zz-not-here", "response": {"status_code": 200, "body": {}}, "error": None},
                           sort_keys=True) + "\n")
    before = open(other).read()
    r = run(["batch", "--bundle", bundle, "--input", inp, "--output", other])
    check(r.returncode == 2 and "not in --input" in r.stderr and open(other).read() == before,
          "an output holding another job's ids: refused untouched")
    # A FIFO as the output: refused, not a blocking open.
    fifo = os.path.join(WORK, "fifo")
    os.mkfifo(fifo)
    r = run(["batch", "--bundle", bundle, "--input", inp, "--output", fifo], timeout=30)
    check(r.returncode == 2 and "FIFO" in r.stderr, "a FIFO as --output: exit 2, no hang")
    # A subnormal temperature is greedy (it used to overflow the logits to NaN).
    tiny = os.path.join(WORK, "tiny.jsonl")
    write_jsonl(tiny, [line("t", {"model": bid, "prompt": "hello world", "max_tokens": 10, "temperature": 1e-40})])
    r = run(["batch", "--bundle", bundle, "--input", tiny, "--output", os.path.join(WORK, "tiny_out.jsonl")])
    t_out = read_lines(os.path.join(WORK, "tiny_out.jsonl"))[1]
    check(r.returncode == 0 and t_out[0]["response"]["body"]["choices"][0]["text"] == text("c-plain"),
          "temperature 1e-40 gives the greedy text")

    # kill -9 and SIGTERM mid-run, then rerun: every id exactly once.
    many = [line(f"r{i:03d}", {"model": bid, "prompt": f"request number {i}", "max_tokens": 48, "temperature": 0,
                               "ignore_eos": True}) for i in range(120)]
    inp2 = os.path.join(WORK, "many.jsonl")
    write_jsonl(inp2, many)
    for sig, want_rc in [(signal.SIGKILL, -9), (signal.SIGTERM, 128 + 15)]:
        out2 = os.path.join(WORK, f"many_{sig.name}.jsonl")
        p = subprocess.Popen([ATMOE, "batch", "--bundle", bundle, "--input", inp2, "--output", out2,
                              "--max-running", "2"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while time.time() - t0 < 60:
            if os.path.exists(out2) and open(out2, "rb").read().count(b"\n") >= 6:
                break
            time.sleep(0.01)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        n_before = open(out2, "rb").read().count(b"\n")
        check(p.returncode == want_rc, f"{sig.name}: exit {want_rc} ({p.returncode}; {err[-200:]})")
        check(6 <= n_before < len(many), f"{sig.name}: stopped mid-run ({n_before} lines)")
        if sig == signal.SIGTERM:
            check("rerun" in err, "SIGTERM: says how to resume")
        r = run(["batch", "--bundle", bundle, "--input", inp2, "--output", out2, "--max-running", "2"])
        _, g3 = read_lines(out2)
        ids = [g["custom_id"] for g in g3]
        check(r.returncode == 0 and sorted(ids) == sorted(m["custom_id"] for m in many),
              f"{sig.name} + rerun: every id exactly once ({len(ids)} lines, {len(set(ids))} ids)")
        check(all(g["response"]["body"]["usage"]["completion_tokens"] == 48 for g in g3),
              f"{sig.name} + rerun: every line complete")

    # Shards partition the input.
    parts = []
    for k in range(3):
        o = os.path.join(WORK, f"shard{k}.jsonl")
        r = run(["batch", "--bundle", bundle, "--input", inp, "--output", o, "--shard", f"{k}/3"])
        check(r.returncode == 0, f"--shard {k}/3: exit 0")
        parts.append([str(g["custom_id"] or g["atmoe"]["line"]) for g in read_lines(o)[1]])
    flat = sum(parts, [])
    check(len(flat) == len(set(flat)) == len(got), f"--shard K/3: disjoint and complete ({len(flat)} of {len(got)})")

    # Bad invocations: one line, exit 2.
    for args, want in [(["--input", inp, "--output", inp], "is the input file"),
                       (["--input", os.path.join(WORK, "absent.jsonl"), "--output", out], "--input: not found"),
                       (["--input", WORK, "--output", out], "is a directory"),
                       (["--input", inp, "--output", out, "--shard", "3/3"], "--shard"),
                       (["--input", inp, "--output", out, "--shard", " 0/2"], "--shard"),
                       (["--input", inp, "--output", out, "--shard", "+0/2"], "--shard"),
                       (["--input", inp, "--output", os.path.join(WORK, "never.jsonl"), "--dtype", "f16"], "--dtype")]:
        r = run(["batch", "--bundle", bundle] + args)
        lines_ = [l for l in r.stderr.splitlines() if l.startswith("atmoe: error:")]
        check(r.returncode == 2 and len(lines_) == 1 and want in lines_[0], f"batch {args[-1]}: exit 2, '{want}'")
    check(not os.path.exists(os.path.join(WORK, "never.jsonl")), "a bad flag leaves no output file behind")

    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
