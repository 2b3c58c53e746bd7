#!/usr/bin/env python3
"""A bounded load test of an OpenAI-compatible server (atmoe serve, llama.cpp's llama-server):
C concurrent clients each send R streamed /v1/completions requests, one after another, with
a fixed number of generated tokens (ignore_eos), and the run records throughput, time to
first token and inter-token latency percentiles, and every error.

Requests cycle through a list of body variants (--variants JSON: a list of objects merged
into each body), e.g. different `model`s and `routing` controls for atmoe, or nothing.

  bench_serve.py --url http://127.0.0.1:8000 --model my-bundle --clients 32 --requests 20 \\
      --max-tokens 16 --variants '[{}, {"routing": {"top_k_groups": 1}}]' --out run.json

Standard library only. Prints one JSON object (also written to --out).
"""
import argparse
import http.client
import json
import os
import statistics
import threading
import time
import urllib.parse

from machine import describe

PROMPTS = [
    "Explain why the sky is blue in simple terms.",
    "Write a short poem about the sea.",
    "What are the main causes of inflation?",
    "Describe how a compiler turns source code into machine code.",
    "List three benefits of regular exercise.",
    "Summarise the plot of a detective story in two sentences.",
    "How does a vaccine train the immune system?",
    "Give advice to someone starting to learn the piano.",
]


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def one_request(host, port, path, body, headers, timeout):
    """Returns (ttft, [inter-token gaps], tokens, error)."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        c.request("POST", path, body=json.dumps(body), headers=headers)
        r = c.getresponse()
        if r.status != 200:
            return None, [], 0, f"HTTP {r.status}: {r.read()[:200]!r}"
        buf, first, last, gaps, tokens, usage = b"", None, None, [], 0, None
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            now = time.perf_counter()
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                ev = ev.strip()
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:]
                if data == b"[DONE]":
                    continue
                j = json.loads(data)
                if j.get("usage"):
                    usage = j["usage"]
                ch = j.get("choices") or []
                if not ch or not (ch[0].get("text") or (ch[0].get("delta") or {}).get("content")):
                    continue
                tokens += 1
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
        if usage and usage.get("completion_tokens"):
            tokens = usage["completion_tokens"]
        return first, gaps, tokens, None
    except Exception as e:  # noqa: BLE001 - every failure is a counted error
        return None, [], 0, repr(e)
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--variants", default="[{}]", help="JSON list of objects merged into the bodies, in turn")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    variants = json.loads(a.variants)
    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = "Bearer " + a.api_key
    ttft, itl, errors, tokens = [], [], [], [0]
    lock = threading.Lock()
    counter = [0]

    def client(ci):
        for ri in range(a.requests):
            with lock:
                k = counter[0]
                counter[0] += 1
            body = {"model": a.model, "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": a.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            body.update(variants[k % len(variants)])
            f, g, n, err = one_request(u.hostname, u.port or 80, "/v1/completions", body, headers, a.timeout)
            with lock:
                if err:
                    errors.append(err)
                else:
                    ttft.append(f)
                    itl.extend(g)
                    tokens[0] += n

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    n_req = a.clients * a.requests
    res = {
        "label": a.label, "url": a.url, "model": a.model, "variants": variants, "machine": describe(),
        "clients": a.clients, "requests_per_client": a.requests, "max_tokens": a.max_tokens,
        "requests": n_req, "errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
        "completion_tokens": tokens[0], "tokens_per_s": tokens[0] / wall, "requests_per_s": (n_req - len(errors)) / wall,
        "ttft_s": {f"p{p}": pct(ttft, p) for p in (50, 90, 99)},
        "itl_s": {f"p{p}": pct(itl, p) for p in (50, 90, 99)},
        "itl_mean_s": statistics.mean(itl) if itl else None,
    }
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
