#!/usr/bin/env python3
"""`atmoe fit-router` and `atmoe fit-intuition` end to end (ctest e2e_fit) on the real
SmolLM2-135M-Instruct GGUF ($ATMOE_TEST_MODEL) with synth-bundle experts:

  - prompts of three topics labelled with three groups: held-out routing accuracy from the
    report; the fitted router steers prompts of *unseen templates* to their group (a
    generate --trace); provenance (data SHA-256) in the file and in `inspect`; a second
    fit writes identical bytes;
  - expert-level targets fit the expert gate of that group only (the other groups' rows of
    W_D stay 0); per_token routers; lambda chosen on dev completions and written to
    atmoe.json;
  - every kind of bad data line, flag and bundle: exit 2, one error line naming the
    file:line and field;
  - fit-intuition: k-means++ centroids of the pooled hidden state recover the three topics.
Usage: fit.py ATMOE WORKDIR
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

ATMOE, WORK = os.path.abspath(sys.argv[1]), sys.argv[2]
MODEL = os.environ.get("ATMOE_TEST_MODEL", "")
ENV = dict(os.environ)
failures = []

TOPICS = {  # group -> (templates, fillers); the last two templates are never trained on
    "medicine": (["How do I bake {} bread?", "Give me a recipe for {} soup.", "What spices go with {} chicken?",
                  "How long should I roast {} vegetables?", "Which oven temperature suits {} pastry?",
                  "Can I freeze {} dough overnight?"],
                 ["sourdough", "rye", "tomato", "garlic", "lemon", "spicy", "sweet", "green"]),
    "law": (["What is {} plus 17?", "Compute the square root of {}.", "Is {} a prime number?", "Factor the number {}.",
             "Divide {} by three and round down.", "What is {} squared minus one?"],
            ["144", "91", "37", "1024", "55", "72", "13", "400"]),
    "code": (["Who won the {} football match?", "How many players are on a {} basketball team?",
              "Explain the offside rule in {} soccer.", "When is the next {} tennis tournament?",
              "Which team leads the {} hockey league?", "How long is a {} rugby game?"],
             ["yesterday's", "college", "local", "national", "youth", "amateur", "weekend", "indoor"]),
}


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def run(args, timeout=600):
    return subprocess.run([ATMOE] + args, capture_output=True, text=True, env=ENV, timeout=timeout)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def safetensors(path):
    """{name: (shape, [floats])} of an F32 safetensors file, and its __metadata__."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    meta = head.pop("__metadata__", {})
    out = {}
    for k, v in head.items():
        assert v["dtype"] == "F32", v
        b, e = v["data_offsets"]
        raw = data[8 + n + b:8 + n + e]
        out[k] = (v["shape"], list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    return out, meta


def topic_lines(templates, extra=None):
    rows = []
    for g, (tpl, fills) in TOPICS.items():
        for t in templates:
            for x in fills:
                row = {"prompt": tpl[t].format(x), "groups": {g: 1}, "task": g}
                if extra:
                    row.update(extra(g))
                rows.append(row)
    return rows


def heaviest_group(bundle, prompt, extra=()):
    trace = os.path.join(WORK, "trace.json")
    r = run(["generate", "--bundle", bundle, "--prompt", prompt, "--max-tokens", "1", "--trace", trace] + list(extra))
    assert r.returncode == 0, r.stderr
    t = json.load(open(trace))
    mean = {}
    for layer in t["layers"]:
        for g, v in layer["groups"].items():
            mean[g] = mean.get(g, 0.0) + v / len(t["layers"])
    return max(mean, key=mean.get), mean


def main():
    if not MODEL or not os.path.exists(MODEL):
        print("ATMOE_TEST_MODEL is not set to the SmolLM2 GGUF")
        return 1
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)

    def bundle(name, *args):
        d = os.path.join(WORK, name)
        r = run(["synth-bundle", "--base", MODEL, "--out", d, "--groups", "3", "--experts-per-group", "2", "--rank", "4",
                 "--targets", "q,v", "--seed", "5", "--b-std", "0.01"] + list(args))
        assert r.returncode == 0, r.stderr
        return d

    # --- groups, per_request ---------------------------------------------------------
    b = bundle("b")
    data = os.path.join(WORK, "data.jsonl")
    write_jsonl(data, topic_lines(range(4)))
    r = run(["fit-router", "--bundle", b, "--data", data, "--holdout", "0.25"])
    check(r.returncode == 0, f"fit-router exits 0 ({r.stderr.strip()[-300:]})")
    rep = json.load(open(os.path.join(b, "router.fit.json")))
    check(rep["heldout_group_accuracy_mean"] >= 0.9, f"held-out group accuracy {rep['heldout_group_accuracy_mean']:.3f} >= 0.9")
    check(rep["split"] == {"seed": 0, "train": 72, "dev": 0, "heldout": 24}, f"split {rep['split']}")
    check(all(l["group_gate"]["converged"] for l in rep["layers"]), "every group gate converged")
    check(os.path.getsize(os.path.join(b, "router.fit.svg")) > 1000, "report picture written")
    tensors, meta = safetensors(os.path.join(b, "router.safetensors"))
    sha = hashlib.sha256(open(data, "rb").read()).hexdigest()
    check(meta.get("data_sha256") == sha and meta.get("atmoe_fit") == "fit-router" and meta.get("data_lines") == "96",
          "provenance in __metadata__ (sha256 as hashlib computes it)")
    check(set(tensors) == {f"layers.{l}.{k}" for l in range(30) for k in
                           ["group_gate.weight", "group_gate.bias", "expert_gate.weight", "expert_gate.bias"]},
          "the router keys of DESIGN 2")
    check(all(v == 0 for l in range(30) for v in tensors[f"layers.{l}.expert_gate.weight"][1]),
          "no expert targets: W_D = 0 (uniform inside groups)")
    r = run(["inspect", b])
    check(r.returncode == 0 and "router:       fitted by atmoe fit-router on data.jsonl (sha256 " + sha[:16] in r.stdout,
          "inspect shows the provenance")
    # Prompts of templates never trained on go to their group.
    right, total = 0, 0
    for g, (tpl, fills) in TOPICS.items():
        for t in (4, 5):
            for x in fills[:2]:
                top, mean = heaviest_group(b, tpl[t].format(x))
                right += top == g
                total += 1
    check(right >= total - 1, f"unseen templates routed to their group: {right}/{total}")
    # --test: the report on a separate file of unseen templates; --data is all training.
    unseen = os.path.join(WORK, "unseen.jsonl")
    write_jsonl(unseen, topic_lines([4, 5]))
    bu = os.path.join(WORK, "b_unseen")
    shutil.copytree(b, bu, symlinks=True)
    r = run(["fit-router", "--bundle", bu, "--data", data, "--test", unseen])
    repu = json.load(open(os.path.join(bu, "router.fit.json")))
    _, metu = safetensors(os.path.join(bu, "router.safetensors"))
    check(r.returncode == 0 and repu["split"]["train"] == 96 and repu["split"]["heldout"] == 48 and
          repu["heldout_file"]["sha256"] == hashlib.sha256(open(unseen, "rb").read()).hexdigest() and
          metu.get("heldout_file") == "unseen.jsonl", f"--test: 96 training lines, the 48 of the test file held out")
    check(repu["heldout_group_accuracy_mean"] >= 0.9, f"--test: unseen templates {repu['heldout_group_accuracy_mean']:.3f} >= 0.9")

    # Deterministic: the same data gives the same bytes.
    first = open(os.path.join(b, "router.safetensors"), "rb").read()
    r = run(["fit-router", "--bundle", b, "--data", data, "--holdout", "0.25"])
    check(r.returncode == 0 and open(os.path.join(b, "router.safetensors"), "rb").read() == first,
          "a second fit writes identical bytes")
    # A fresh bundle without a router file fits too.
    os.remove(os.path.join(b, "router.safetensors"))
    r = run(["fit-router", "--bundle", b, "--data", data, "--holdout", "0.25"])
    check(r.returncode == 0 and open(os.path.join(b, "router.safetensors"), "rb").read() == first,
          "a bundle without router.safetensors gets the same router")

    # The bundle's temperature: the written weights are the fit times tau_group, so the
    # routing (and the held-out report) is the same at any tau.
    bt2 = os.path.join(WORK, "b_tau")
    shutil.copytree(b, bt2, symlinks=True)
    m2 = json.load(open(os.path.join(bt2, "atmoe.json")))
    m2["router"]["tau_group"] = 0.5
    json.dump(m2, open(os.path.join(bt2, "atmoe.json"), "w"))
    r = run(["fit-router", "--bundle", bt2, "--data", data, "--holdout", "0.25"])
    t1, _ = safetensors(os.path.join(b, "router.safetensors"))
    t2, _ = safetensors(os.path.join(bt2, "router.safetensors"))
    w1, w2 = t1["layers.7.group_gate.weight"][1], t2["layers.7.group_gate.weight"][1]
    rep2 = json.load(open(os.path.join(bt2, "router.fit.json")))
    check(r.returncode == 0 and max(abs(x2 - 0.5 * x1) for x1, x2 in zip(w1, w2)) <= 1e-6 * max(abs(x) for x in w1),
          "tau_group 0.5: the weights are the fit times 0.5")
    check(abs(rep2["layers"][7]["heldout"]["group_cross_entropy"] - rep["layers"][7]["heldout"]["group_cross_entropy"]) < 1e-4,
          "tau_group 0.5: the same held-out routing")

    # --- expert targets inside one group ----------------------------------------------
    be = bundle("be")
    rows = []
    for row in topic_lines(range(4)):
        if row["task"] == "medicine":  # bread/pastry-like templates -> expert 0, the others -> expert 1
            e = "medicine-0" if ("bread" in row["prompt"] or "soup" in row["prompt"]) else "medicine-1"
            row = {"prompt": row["prompt"], "experts": {e: 1}, "task": e}
        rows.append(row)
    write_jsonl(os.path.join(WORK, "experts.jsonl"), rows)
    r = run(["fit-router", "--bundle", be, "--data", os.path.join(WORK, "experts.jsonl")])
    check(r.returncode == 0, f"fit-router with expert targets ({r.stderr.strip()[-200:]})")
    rep = json.load(open(os.path.join(be, "router.fit.json")))
    acc = [l["heldout"]["expert_accuracy"] for l in rep["layers"]]
    check(all("expert_gate.medicine" in l for l in rep["layers"]) and not any("expert_gate.law" in l for l in rep["layers"]),
          "an expert gate for the group with expert targets only")
    check(sum(acc) / len(acc) >= 0.8, f"held-out expert accuracy {sum(acc) / len(acc):.3f} >= 0.8")
    tensors, _ = safetensors(os.path.join(be, "router.safetensors"))
    wd = tensors["layers.10.expert_gate.weight"][1]
    d = 576
    check(any(v != 0 for v in wd[:2 * d]) and all(v == 0 for v in wd[2 * d:]), "W_D rows: medicine's fitted, the rest 0")

    # --- per_token router, and lambda on dev completions -------------------------------
    bt = bundle("bt", "--router-input", "per_token", "--general")
    write_jsonl(os.path.join(WORK, "tok.jsonl"), topic_lines(range(4), lambda g: {"completion": " Sure."}))
    r = run(["fit-router", "--bundle", bt, "--data", os.path.join(WORK, "tok.jsonl"), "--lambda-grid", "0,0.5,1"])
    check(r.returncode == 0, f"per_token fit with lambda ({r.stderr.strip()[-200:]})")
    rep = json.load(open(os.path.join(bt, "router.fit.json")))
    check(rep["router_input"] == "per_token" and rep["rows"] > 96, f"per_token rows: {rep['rows']} token rows")
    check(rep["heldout_group_accuracy_mean"] >= 0.8, f"per_token held-out accuracy {rep['heldout_group_accuracy_mean']:.3f}")
    lam = rep["lambda"]
    man = json.load(open(os.path.join(bt, "atmoe.json")))
    check(lam is not None and len(lam["tried"]) == 3 and lam["dev_lines"] == 10 and
          lam["chosen"] == min(lam["tried"], key=lambda t: t["nll"])["lambda"] and man["lambda"] == lam["chosen"],
          f"lambda {lam and lam['chosen']} chosen on the dev lines and written to atmoe.json")
    _, meta = safetensors(os.path.join(bt, "router.safetensors"))
    check(meta.get("lambda") is not None and meta.get("dev_lines") == "10", "lambda and dev lines in the provenance")
    # The router is fitted on inputs taken at the lambda it runs with (synth-bundle's is 0.8:
    # any other choice means features again at the chosen lambda and a refit).
    check(lam["features_lambda"] == lam["chosen"] and lam.get("refit", False) == (lam["chosen"] != 0.8),
          f"features at the chosen lambda (features {lam['features_lambda']}, chosen {lam['chosen']}, "
          f"refit {lam.get('refit')})")

    # --- bad input ------------------------------------------------------------------------
    good = json.dumps({"prompt": "How do I bake rye bread?", "groups": {"medicine": 1}})
    bad_lines = {
        "not json": ("{not json", "not valid JSON"),
        "array": ("[1, 2]", "expected a JSON object"),
        "unknown field": (json.dumps({"prompt": "x", "groups": {"law": 1}, "label": "law"}), "unknown field 'label'"),
        "prompt and messages": (json.dumps({"prompt": "x", "messages": [{"role": "user", "content": "x"}],
                                            "groups": {"law": 1}}), "exactly one of \"prompt\""),
        "no prompt": (json.dumps({"groups": {"law": 1}}), "exactly one of \"prompt\""),
        "empty prompt": (json.dumps({"prompt": "", "groups": {"law": 1}}), "prompt: expected a non-empty string"),
        "bad role": (json.dumps({"messages": [{"role": "wizard", "content": "x"}], "groups": {"law": 1}}),
                     "messages[0].role"),
        "unknown group": (json.dumps({"prompt": "x", "groups": {"physics": 1}}), "groups: 'physics' is not a group"),
        "unknown expert": (json.dumps({"prompt": "x", "experts": {"law-7": 1}}), "experts: 'law-7' is not an expert"),
        "negative weight": (json.dumps({"prompt": "x", "groups": {"law": -1}}), "groups.law: expected a finite weight"),
        "zero weights": (json.dumps({"prompt": "x", "groups": {"law": 0}}), "must sum to a positive value"),
        "two targets": (json.dumps({"prompt": "x", "groups": {"law": 1}, "experts": {"law-0": 1}}), "exactly one target"),
        "no target": (json.dumps({"prompt": "x"}), "exactly one target"),
        "completion type": (json.dumps({"prompt": "x", "groups": {"law": 1}, "completion": 3}), "completion: expected a string"),
    }
    for name, (line, want) in bad_lines.items():
        p = os.path.join(WORK, "bad.jsonl")
        write_jsonl(p, [good, good, line, good])
        r = run(["fit-router", "--bundle", b, "--data", p])
        err = r.stderr.strip().splitlines()
        check(r.returncode == 2 and len(err) == 1 and f"bad.jsonl:3: " in err[0] and want in err[0],
              f"bad line ({name}): exit {r.returncode}, {err[-1] if err else ''}")
    write_jsonl(os.path.join(WORK, "two.jsonl"), [l for l in topic_lines(range(4)) if l["task"] != "code"])
    cases = {
        "a group without examples": (["--bundle", b, "--data", os.path.join(WORK, "two.jsonl")], "group 'code' has no target weight"),
        "holdout out of range": (["--bundle", b, "--data", data, "--holdout", "2"], "--holdout 2"),
        "l2 zero": (["--bundle", b, "--data", data, "--l2", "0"], "--l2 0"),
        "missing data": (["--bundle", b, "--data", os.path.join(WORK, "nope.jsonl")], "nope.jsonl"),
        "lambda grid": (["--bundle", bt, "--data", data, "--lambda-grid", "0,2"], "--lambda-grid"),
    }
    open(os.path.join(WORK, "empty.jsonl"), "w").write("\n\n")
    cases["empty data"] = (["--bundle", b, "--data", os.path.join(WORK, "empty.jsonl")], "no data lines")
    for name, (args, want) in cases.items():
        r = run(["fit-router"] + args)
        err = r.stderr.strip().splitlines()
        check(r.returncode == 2 and len(err) == 1 and want in err[0], f"{name}: exit {r.returncode}, {err[-1] if err else ''}")

    # --- fit-intuition ------------------------------------------------------------------------
    bx = os.path.join(WORK, "trex")
    r = run(["synth-bundle", "--base", MODEL, "--out", bx, "--method", "t-rex", "--trex-mode", "rank1", "--rank", "3",
             "--targets", "q,v", "--seed", "6", "--intuition-layer", "20"])
    assert r.returncode == 0, r.stderr
    prompts = [{"prompt": row["prompt"]} for row in topic_lines(range(6))]
    write_jsonl(os.path.join(WORK, "prompts.jsonl"), prompts)
    r = run(["fit-intuition", "--bundle", bx, "--data", os.path.join(WORK, "prompts.jsonl"), "--clusters", "3"])
    check(r.returncode == 0, f"fit-intuition exits 0 ({r.stderr.strip()[-200:]})")
    tensors, meta = safetensors(os.path.join(bx, "centroids.safetensors"))
    check(tensors["centroids"][0] == [3, 576], f"centroids [3, 576]: {tensors['centroids'][0]}")
    check(meta.get("cluster_sizes") == "48,48,48" or sorted(meta.get("cluster_sizes", "").split(",")) == ["48", "48", "48"],
          f"the three topics are the three clusters (sizes {meta.get('cluster_sizes')})")
    r = run(["inspect", bx])
    check(r.returncode == 0 and "fitted by atmoe fit-intuition on prompts.jsonl" in r.stdout, "inspect shows the centroids' provenance")
    r = run(["generate", "--bundle", bx, "--prompt", "How do I bake rye bread?", "--max-tokens", "2"])
    check(r.returncode == 0, "the bundle generates with the fitted centroids")
    for args, want in [(["--clusters", "4"], "--clusters 4: the experts of"),
                       (["--clusters", "0"], "--clusters 0")]:
        r = run(["fit-intuition", "--bundle", bx, "--data", os.path.join(WORK, "prompts.jsonl")] + args)
        err = r.stderr.strip().splitlines()
        check(r.returncode == 2 and len(err) == 1 and want in err[0], f"fit-intuition {args}: {err[-1] if err else ''}")
    r = run(["fit-intuition", "--bundle", b, "--data", os.path.join(WORK, "prompts.jsonl"), "--clusters", "3"])
    check(r.returncode == 2 and "is a at-moe bundle" in r.stderr, "fit-intuition refuses an at-moe bundle")
    r = run(["fit-router", "--bundle", bx, "--data", data])
    check(r.returncode == 2 and "is a t-rex bundle" in r.stderr, "fit-router refuses a t-rex bundle")

    # --- the committed example bundle (examples/routed-tasks): prompts of instruction
    # templates that neither its experts nor its router saw go to the right group, and the
    # bundle answers them (at its fitted lambda: 0 since the general expert was added, i.e.
    # the general expert's answers; examples/routed-tasks/README.md).
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "routed-tasks", "bundle")
    ex = os.path.join(WORK, "routed-tasks")
    os.makedirs(ex)
    for name in os.listdir(src):
        if name != "base.gguf":
            os.symlink(os.path.realpath(os.path.join(src, name)), os.path.join(ex, name))
    os.symlink(MODEL, os.path.join(ex, "base.gguf"))
    cases = [("Say the following words backwards, last word first: winter candle rocket", "text", "rocket candle winter"),
             ("Change all the letters to upper case: silver forest", "text", "SILVER FOREST"),
             ("Label this word with one of animal / fruit / color / vehicle: mango", "label", "fruit"),
             ("Answer even or odd for the number 4817.", "label", "odd"),
             ("Give the European form (DD/MM/YYYY) of the date 2019-11-05.", "format", "05/11/2019"),
             ("Express width=12 depth=4 as a JSON dictionary with numeric values.", "format", '{"width": 12, "depth": 4}')]
    right, answered = 0, 0
    for prompt, group, answer in cases:
        top, _ = heaviest_group(ex, prompt, ["--chat"])
        r = run(["generate", "--bundle", ex, "--chat", "--prompt", prompt, "--max-tokens", "24"])
        right += top == group
        answered += r.stdout.strip() == answer
        print(f"     {prompt!r}: {top}, {r.stdout.strip()!r}")
    check(right == len(cases), f"example bundle: unseen prompts routed to their group {right}/{len(cases)}")
    check(answered >= len(cases) - 1, f"example bundle: answers exact {answered}/{len(cases)}")

    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
