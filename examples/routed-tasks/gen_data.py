#!/usr/bin/env python3
"""Deterministic synthetic task data for the routed-tasks example.

Six exact-match tasks in three groups, each phrased by 10 instruction templates of which
the last 2 are held out (they appear only in the test files, so a router cannot key on a
fixed prefix), plus compound instructions that need two experts (answer = task A applied,
then task B applied to A's output). Standard library only; the same --seed gives the
same bytes.

    group   expert          input                 -> answer
    text    reverse-words   "blue river apple"    -> "apple river blue"
    text    uppercase       "blue river"          -> "BLUE RIVER"
    label   category        "tiger"               -> "animal"   (animal|fruit|color|vehicle)
    label   parity          "3417"                -> "odd"
    format  date-dmy        "2021-03-09"          -> "09/03/2021"
    format  kv-json         "age=31 size=7"       -> {"age": 31, "size": 7}

Files written under --out (default ./data):
    train/<expert>.jsonl     LoRA training items (train templates)
    train/general.jsonl      the mixture of all six (for the general expert)
    test/<expert>.jsonl      held-out templates, one file per task
    test/compound.jsonl      held-out compound templates (two experts each)
    route_train.jsonl        for `atmoe fit-router --data`: train templates, single + compound
    route_test.jsonl         same format, held-out templates, single + compound
Every line has "messages" (one user turn: atmoe renders it with the chat template, as
`generate --chat` and /v1/chat/completions do), "completion" (the exact answer), "experts"
({name: 1}, or {A: 0.5, B: 0.5} for a compound) and "task"; the train/test files add
"template" (its index) and "compound" ([A, B]), which `atmoe fit-router` would refuse.
"""
import argparse
import json
import os
import random

GROUPS = [
    ("text", ["reverse-words", "uppercase"]),
    ("label", ["category", "parity"]),
    ("format", ["date-dmy", "kv-json"]),
]
EXPERTS = [e for _, es in GROUPS for e in es]
N_HELDOUT = 2  # the last N_HELDOUT templates of every list are test-only

WORDS = ("apple river blue stone cloud green table music paper light window garden winter "
         "summer yellow silver forest candle bottle mountain pencil rabbit orange purple "
         "bridge castle coffee dragon engine flower guitar island jacket kettle ladder "
         "marble needle ocean pillow rocket shadow tunnel valley wallet basket butter "
         "circle doctor farmer hammer letter mirror number planet silence sugar ticket").split()

CATEGORIES = {
    "animal": "tiger horse rabbit eagle shark zebra monkey camel wolf sheep dolphin parrot".split(),
    "fruit": "apple banana mango cherry grape lemon peach plum melon kiwi papaya apricot".split(),
    "color": "red blue green yellow purple orange pink brown black white violet grey".split(),
    "vehicle": "car bus truck train bicycle boat tractor scooter taxi airplane van tram".split(),
}
WORD_CATEGORY = {w: c for c, ws in CATEGORIES.items() for w in ws}

KV_KEYS = "age size count price year score width height speed level weight depth".split()

# Templates: {x} is the input. Ten per task, the last two held out for the tests. The
# train templates vary the input's position (first, last, inside), the separator (":",
# "\n", "\n\n", quotes, a label line) and the wording; the held-out ones reuse none of
# their sentences.
TEMPLATES = {
    "reverse-words": [
        "Reverse the order of the words: {x}",
        "Write these words in reverse order.\n{x}",
        "{x}\nPut the words above in the opposite order.",
        "Flip the word order of \"{x}\".",
        "Words: {x}\nList them from last to first.",
        "{x}\n\nReverse the word order.",
        "Read these words backwards (keep each word as it is) and write them out: {x}",
        "Here is a sequence of words:\n\n{x}\n\nOutput the same words in reverse order.",
        # held out
        "Say the following words backwards, last word first: {x}",
        "{x}\n\nRearrange these words so the final one comes first and the first one last.",
    ],
    "uppercase": [
        "Convert to uppercase: {x}",
        "Write this in capital letters.\n{x}",
        "{x}\nRewrite the text above in all caps.",
        "Make every letter of \"{x}\" uppercase.",
        "Text: {x}\nReturn it in upper case.",
        "{x}\n\nCapitalize every letter.",
        "Please turn the following into uppercase letters: {x}",
        "Here is some text:\n\n{x}\n\nWrite it again in ALL CAPS.",
        # held out
        "Change all the letters to upper case: {x}",
        "{x}\n\nShout this: repeat it using only capital letters.",
    ],
    "category": [
        "Which category does this word belong to (animal, fruit, color or vehicle)? {x}",
        "Classify the word as animal, fruit, color or vehicle.\n{x}",
        "{x}\nIs this an animal, a fruit, a color or a vehicle?",
        "Give the category of \"{x}\": animal, fruit, color or vehicle.",
        "Word: {x}\nCategory (animal/fruit/color/vehicle)?",
        "{x}\n\nAnswer with one word: animal, fruit, color or vehicle.",
        "Tell me if {x} is an animal, a fruit, a color or a vehicle.",
        "Categories: animal, fruit, color, vehicle.\n\nWord: {x}\n\nWhich category?",
        # held out
        "Label this word with one of animal / fruit / color / vehicle: {x}",
        "{x}\n\nWhat kind of thing is this? Answer animal, fruit, color or vehicle.",
    ],
    "parity": [
        "Is this number even or odd? {x}",
        "Tell me whether the number is even or odd.\n{x}",
        "{x}\nEven or odd?",
        "Classify {x} as even or odd.",
        "Number: {x}\nParity (even/odd)?",
        "{x}\n\nIs it even or odd? Answer in one word.",
        "Decide if {x} is an even or an odd number.",
        "Here is a number:\n\n{x}\n\nSay even or odd.",
        # held out
        "Answer even or odd for the number {x}.",
        "{x}\n\nCan this number be divided by two with no remainder? Reply even or odd.",
    ],
    "date-dmy": [
        "Convert this date to DD/MM/YYYY: {x}",
        "Rewrite the date in day/month/year format.\n{x}",
        "{x}\nWrite this ISO date as DD/MM/YYYY.",
        "Change \"{x}\" from YYYY-MM-DD to DD/MM/YYYY.",
        "Date: {x}\nFormat it as DD/MM/YYYY.",
        "{x}\n\nConvert to day/month/year with slashes.",
        "Please write the date {x} in the DD/MM/YYYY style.",
        "Here is an ISO 8601 date:\n\n{x}\n\nGive it as DD/MM/YYYY.",
        # held out
        "Give the European form (DD/MM/YYYY) of the date {x}.",
        "{x}\n\nReformat the date above as day/month/year, separated by slashes.",
    ],
    "kv-json": [
        "Convert these key=value pairs to JSON: {x}",
        "Turn the following into a JSON object.\n{x}",
        "{x}\nWrite the pairs above as JSON.",
        "Make a JSON object from \"{x}\".",
        "Pairs: {x}\nOutput them as a JSON object.",
        "{x}\n\nConvert to JSON.",
        "Please encode {x} as JSON with integer values.",
        "Here are some settings:\n\n{x}\n\nWrite them as a JSON object.",
        # held out
        "Express {x} as a JSON dictionary with numeric values.",
        "{x}\n\nSerialise these assignments as a JSON map.",
    ],
}

# Compound instructions: frames x fragments. {a}/{b} are fragments of task A and task B,
# {x} the input. The last two frames and the last fragment of each list are held out.
COMPOUND_FRAMES = [
    "First {a}, then {b}: {x}",
    "{x}\n{A}, and after that {b}.",
    "{A}. Then {b}.\n{x}",
    "Take \"{x}\": {a}, then {b}.",
    # held out
    "Do two things with \"{x}\": {a}; next, {b}.",
    "{x}\n\nStep 1: {a}. Step 2: {b}.",
]
FRAGMENTS_A = {
    "reverse-words": ["reverse the order of the words", "put the words in reverse order",
                      "write the words backwards, last one first"],
    "category": ["name the category of the word (animal, fruit, color or vehicle)",
                 "classify the word as animal, fruit, color or vehicle",
                 "say which of animal, fruit, color or vehicle the word is"],
    "parity": ["say whether the number is even or odd", "classify the number as even or odd",
               "tell if the number is even or odd"],
    "kv-json": ["convert the key=value pairs to JSON", "turn the pairs into a JSON object",
                "encode the pairs as a JSON dictionary"],
}
FRAGMENTS_B = {
    "uppercase": ["write the result in uppercase", "put the answer in capital letters",
                  "give the result in all caps"],
    "kv-json": ["convert the key=value pairs to JSON", "turn the pairs into a JSON object",
                "encode the pairs as a JSON dictionary"],
}
# (A, B): apply A, then B to A's answer. Every group appears; two pairs cross groups.
COMPOUND_PAIRS = [
    ("reverse-words", "uppercase"),  # text + text
    ("category", "uppercase"),       # label + text
    ("parity", "uppercase"),         # label + text
    ("kv-json", "uppercase"),        # format + text
    ("reverse-words", "kv-json"),    # text + format: "age=1 size=2" -> pairs reversed -> JSON
]


def make_input(task, rng):
    if task == "reverse-words":
        n = rng.randint(2, 5)
        return " ".join(rng.sample(WORDS, n))
    if task == "uppercase":
        n = rng.randint(1, 4)
        return " ".join(rng.sample(WORDS, n))
    if task == "category":
        return rng.choice(sorted(WORD_CATEGORY))
    if task == "parity":
        return str(rng.randint(10, 99999))
    if task == "date-dmy":
        y, m = rng.randint(1950, 2049), rng.randint(1, 12)
        d = rng.randint(1, 28)
        return f"{y:04d}-{m:02d}-{d:02d}"
    if task == "kv-json":
        n = rng.randint(2, 3)
        return " ".join(f"{k}={rng.randint(1, 99)}" for k in rng.sample(KV_KEYS, n))
    raise ValueError(task)


def answer(task, x):
    if task == "reverse-words":
        return " ".join(reversed(x.split()))
    if task == "uppercase":
        return x.upper()
    if task == "category":
        return WORD_CATEGORY[x]
    if task == "parity":
        return "even" if int(x) % 2 == 0 else "odd"
    if task == "date-dmy":
        y, m, d = x.split("-")
        return f"{d}/{m}/{y}"
    if task == "kv-json":
        return json.dumps({k: int(v) for k, v in (p.split("=") for p in x.split())})
    raise ValueError(task)


def compound_input(a, b, rng):
    if a == "reverse-words" and b == "kv-json":
        return make_input("kv-json", rng)
    return make_input(a, rng)


def split_idx(n, heldout):
    """Template indices of the train split (heldout=False) or test split (True)."""
    return list(range(n - N_HELDOUT, n)) if heldout else list(range(n - N_HELDOUT))


def single_items(task, n, rng, heldout):
    idx = split_idx(len(TEMPLATES[task]), heldout)
    out = []
    for i in range(n):
        t = idx[i % len(idx)]  # balanced over templates
        x = make_input(task, rng)
        out.append({"task": task, "template": t, "input": x,
                    "prompt": TEMPLATES[task][t].format(x=x), "completion": answer(task, x),
                    "experts": {task: 1}})
    return out


def compound_items(n_per_pair, rng, heldout):
    frames = split_idx(len(COMPOUND_FRAMES), heldout)
    out = []
    for a, b in COMPOUND_PAIRS:
        fa = FRAGMENTS_A[a]
        fb = FRAGMENTS_B[b]
        fa_idx = [len(fa) - 1] if heldout else list(range(len(fa) - 1))
        fb_idx = [len(fb) - 1] if heldout else list(range(len(fb) - 1))
        for i in range(n_per_pair):
            t = frames[i % len(frames)]
            x = compound_input(a, b, rng)
            sa = fa[rng.choice(fa_idx)]
            sb = fb[rng.choice(fb_idx)]
            prompt = COMPOUND_FRAMES[t].format(a=sa, A=sa[0].upper() + sa[1:], b=sb, x=x)
            out.append({"task": f"{a}+{b}", "template": t, "input": x, "prompt": prompt,
                        "completion": answer(b, answer(a, x)), "experts": {a: 0.5, b: 0.5},
                        "compound": [a, b]})
    return out


def chat_line(it, extra):
    # "task" is also a field of fit-router's format (its report gives held-out accuracy per
    # task); "template" and "compound" are not, so the route files leave them out.
    line = {"messages": [{"role": "user", "content": it["prompt"]}], "completion": it["completion"],
            "experts": it["experts"], "task": it["task"]}
    if extra:
        line.update({k: it[k] for k in ("template", "compound") if k in it})
    return line


def write_jsonl(path, items, extra=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(chat_line(it, extra), ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train-per-task", type=int, default=800, help="LoRA training items per task")
    ap.add_argument("--test-per-task", type=int, default=60, help="held-out test items per task")
    ap.add_argument("--route-per-task", type=int, default=80, help="router training items per task")
    ap.add_argument("--compound-train-per-pair", type=int, default=40, help="compound items per pair in route_train")
    ap.add_argument("--compound-test-per-pair", type=int, default=40, help="compound items per pair in the tests")
    args = ap.parse_args()

    for t in EXPERTS:
        assert len(TEMPLATES[t]) >= 6 and len(set(TEMPLATES[t])) == len(TEMPLATES[t]), t
    rng = random.Random(args.seed)  # one stream, consumed in a fixed order
    train = {t: single_items(t, args.train_per_task, rng, heldout=False) for t in EXPERTS}
    test = {t: single_items(t, args.test_per_task, rng, heldout=True) for t in EXPERTS}
    route_single = [it for t in EXPERTS for it in single_items(t, args.route_per_task, rng, heldout=False)]
    route_comp = compound_items(args.compound_train_per_pair, rng, heldout=False)
    test_comp = compound_items(args.compound_test_per_pair, rng, heldout=True)

    for t in EXPERTS:
        write_jsonl(os.path.join(args.out, "train", t + ".jsonl"), train[t])
        write_jsonl(os.path.join(args.out, "test", t + ".jsonl"), test[t])
    general = [it for t in EXPERTS for it in train[t]]
    rng.shuffle(general)
    write_jsonl(os.path.join(args.out, "train", "general.jsonl"), general)
    write_jsonl(os.path.join(args.out, "test", "compound.jsonl"), test_comp)

    route_train = route_single + route_comp
    rng.shuffle(route_train)
    write_jsonl(os.path.join(args.out, "route_train.jsonl"), route_train, extra=False)
    write_jsonl(os.path.join(args.out, "route_test.jsonl"),
                [it for t in EXPERTS for it in test[t]] + test_comp, extra=False)
    with open(os.path.join(args.out, "groups.json"), "w") as f:
        json.dump([{"name": g, "experts": es} for g, es in GROUPS], f, indent=1)
    print(f"wrote {args.out}: {len(EXPERTS)} tasks x {args.train_per_task} train, x {args.test_per_task} test; "
          f"route_train {len(route_train)} lines, route_test {len(EXPERTS) * args.test_per_task + len(test_comp)} lines")


if __name__ == "__main__":
    main()
