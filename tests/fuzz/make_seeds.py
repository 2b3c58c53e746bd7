#!/usr/bin/env python3
"""Writes the seed corpora of the loader fuzz targets (standard library only, deterministic):

  tests/fuzz/seeds/tokenizer_json/   tokenizer.json texts          -> fuzz_tokenizer_json
  tests/fuzz/seeds/bundle_manifest/  atmoe.json texts              -> fuzz_bundle_manifest
  tests/fuzz/seeds/peft_adapter/     u32le N | N bytes adapter_config.json | adapter_model.safetensors
                                                                   -> fuzz_peft_adapter

Valid inputs of every supported form plus near-valid ones (one field wrong) so the fuzzer
starts deep in each loader. Run from anywhere: python3 tests/fuzz/make_seeds.py
The base shapes of the PEFT seeds match fuzz_peft_adapter.cpp (tiny Llama: 2 layers,
hidden 16, k/v out 8, FFN 32).
"""
import json
import math
import os
import random
import shutil
import struct

SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def reset(target):
    shutil.rmtree(os.path.join(SEEDS, target), ignore_errors=True)


# ---------------------------------------------------------------------------------------
# tokenizer.json

CORPUS = ("The quick brown fox jumps over the lazy dog. Hello, world! How are you today? "
          "the the the quick quick 0123456789 experts route tokens to the experts")


def byte_alphabet():
    """GPT-2 bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n."""
    out, n = [], 0
    for b in range(256):
        keep = 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
        out.append(chr(b) if keep else chr(256 + n))
        n += 0 if keep else 1
    return out


def learn_merges(alpha, n_merges):
    words = []
    text = CORPUS.encode()
    for i, w in enumerate(text.split(b" ")):
        w = (b" " if i else b"") + w
        words.append([alpha[c] for c in w])
    merges = []
    for _ in range(n_merges):
        cnt = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                cnt[(a, b)] = cnt.get((a, b), 0) + 1
        if not cnt:
            break
        (l, r), c = max(cnt.items(), key=lambda kv: (kv[1], kv[0]))
        if c < 2:
            break
        merges.append((l, r))
        for w in words:
            i = 0
            while i + 1 < len(w):
                if w[i] == l and w[i + 1] == r:
                    w[i:i + 2] = [l + r]
                i += 1
    return merges


def tokenizer_json(pre_tokenizer, merges_as_pairs=False, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                   user_tokens=(), post_processor=None, n_merges=40, drop_bytes=0):
    alpha = byte_alphabet()
    merges = learn_merges(alpha, n_merges)
    vocab = alpha[drop_bytes:] + [l + r for l, r in merges]
    vocab = list(dict.fromkeys(vocab))
    jv = {t: i for i, t in enumerate(vocab)}
    added = []
    for k, s in enumerate(list(specials) + list(user_tokens)):
        i = len(vocab) + k
        jv[s] = i
        added.append({"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": k < len(specials)})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": jv,
                  "merges": [[l, r] for l, r in merges] if merges_as_pairs else [l + " " + r for l, r in merges]},
    }


LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def tokenizer_seeds():
    t = "tokenizer_json"
    reset(t)
    dump = lambda j: json.dumps(j, ensure_ascii=False, indent=None, separators=(",", ":"))
    write(t, "bytelevel_gpt2.json", dump(tokenizer_json(BYTELEVEL)))
    llama3 = tokenizer_json(
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_RE}, "behavior": "Isolated", "invert": False},
            dict(BYTELEVEL, use_regex=False)]},
        merges_as_pairs=True, specials=("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>"),
        post_processor={"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [], "special_tokens": {}}]})
    write(t, "llama3_split_pairs.json", dump(llama3))
    smol = tokenizer_json({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTELEVEL]},
                          user_tokens=("<fim_prefix>", "experts"), n_merges=20)
    write(t, "smollm_digits_user_tokens.json", dump(smol))
    tpl = tokenizer_json(BYTELEVEL, n_merges=10, post_processor={
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}]})
    write(t, "template_bos.json", dump(tpl))
    write(t, "missing_bytes.json", dump(tokenizer_json(BYTELEVEL, n_merges=5, drop_bytes=200)))
    # Near-valid: one thing wrong each.
    bad = tokenizer_json(BYTELEVEL, n_merges=3)
    bad["model"]["type"] = "WordPiece"
    write(t, "bad_model_type.json", dump(bad))
    bad = tokenizer_json(BYTELEVEL, n_merges=3)
    bad["model"]["vocab"]["!"] = 1 << 30
    write(t, "bad_vocab_id.json", dump(bad))
    bad = tokenizer_json(BYTELEVEL, n_merges=3)
    bad["added_tokens"][0]["id"] = -5
    write(t, "bad_added_id.json", dump(bad))
    bad = tokenizer_json({"type": "Split", "pattern": {"Regex": "(("}, "behavior": "Isolated"}, n_merges=3)
    write(t, "bad_split_regex.json", dump(bad))
    bad = tokenizer_json({"type": "Metaspace", "replacement": "\u2581"}, n_merges=3)
    write(t, "bad_pretok_type.json", dump(bad))
    write(t, "tiny_vocab.json", dump({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "<s>": 3},
                                                "merges": ["a b"]},
                                      "added_tokens": [{"id": 3, "content": "<s>", "special": True}],
                                      "pre_tokenizer": None}))


# ---------------------------------------------------------------------------------------
# atmoe.json (the scratch bundle of fuzz_bundle_manifest.cpp holds base.gguf, base_hf/,
# router.safetensors, centroids.safetensors, centroids.npy, experts/{cardio,onco,contracts,
# torts,general,a,b}/ and trex/)

def bundle_seeds():
    t = "bundle_manifest"
    reset(t)
    full = {
        "format": "atmoe-bundle", "version": 1, "base_model": "base.gguf", "method": "at-moe",
        "groups": [
            {"name": "medicine", "experts": [{"name": "cardio", "adapter": "experts/cardio"},
                                             {"name": "onco", "adapter": "experts/onco"}]},
            {"name": "law", "experts": [{"name": "contracts", "adapter": "experts/contracts"},
                                        {"name": "torts", "adapter": "experts/torts/"}]}],
        "general_expert": {"name": "general", "adapter": "experts/general"},
        "lambda": 0.8,
        "router": {"file": "router.safetensors", "input": "per_request", "tau_group": 1.0, "tau_expert": 0.5},
    }
    dump = lambda j: json.dumps(j, indent=1)
    write(t, "at_moe_full.json", dump(full))
    minimal = {"format": "atmoe-bundle", "version": 1, "base_model": "base_hf", "method": "at-moe",
               "groups": [{"name": "g", "experts": [{"name": "a", "adapter": "experts/a"}]}],
               "router": {"file": "router.safetensors"}}
    write(t, "at_moe_minimal_hf_base.json", dump(minimal))
    pt = json.loads(json.dumps(minimal))
    pt["groups"][0]["experts"].append({"name": "b", "adapter": "./experts/b"})
    pt["router"].update({"input": "per_token", "tau_group": 0, "tau_expert": 1e6})
    pt["lambda"] = 0
    write(t, "at_moe_per_token.json", dump(pt))
    for src, extra in (("embedding", {}), ("hidden_state", {"layer": 7})):
        tr = {"format": "atmoe-bundle", "version": 1, "base_model": "base.gguf", "method": "t-rex",
              "t_rex": {"adapter": "trex", "centroids": "centroids.safetensors" if extra else "centroids.npy",
                        "intuition": dict({"source": src}, **extra)}}
        write(t, f"trex_{src}.json", dump(tr))
    # Near-valid: one field wrong each.
    def variant(name, edit):
        j = json.loads(json.dumps(full))
        edit(j)
        write(t, name, dump(j))
    variant("bad_escape_path.json", lambda j: j["groups"][0]["experts"][0].update(adapter="experts/../../etc"))
    variant("bad_absolute_path.json", lambda j: j.update(base_model="/etc/passwd"))
    variant("bad_duplicate_expert.json", lambda j: j["groups"][1]["experts"][0].update(name="cardio"))
    variant("bad_shared_adapter.json", lambda j: j["groups"][1]["experts"][0].update(adapter="experts/cardio/"))
    variant("bad_expert_named_group.json", lambda j: j["groups"][1]["experts"][0].update(name="medicine"))
    variant("bad_name_chars.json", lambda j: j["groups"][0].update(name="a,b=c"))
    variant("bad_version.json", lambda j: j.update(version=2))
    variant("bad_lambda.json", lambda j: j.update({"lambda": 1.5}))
    variant("bad_unknown_key.json", lambda j: j.update(lamda=0.5))
    variant("bad_missing_base.json", lambda j: j.update(base_model="nope.gguf"))
    variant("bad_router_input.json", lambda j: j["router"].update(input="per_layer"))
    variant("bad_empty_group.json", lambda j: j["groups"][1].update(experts=[]))


# ---------------------------------------------------------------------------------------
# PEFT adapters

N_LAYERS = 2
SITES = [("q_proj", "self_attn", 16, 16), ("k_proj", "self_attn", 16, 8), ("v_proj", "self_attn", 16, 8),
         ("o_proj", "self_attn", 16, 16), ("gate_proj", "mlp", 16, 32), ("up_proj", "mlp", 16, 32),
         ("down_proj", "mlp", 32, 16)]  # (module, parent, d_in, d_out) of fuzz_peft_adapter.cpp
SITE = {m: (p, di, do) for m, p, di, do in SITES}


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def pack(dtype, values):
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    if dtype == "BF16":  # round to nearest even on the upper 16 bits (NaN stays NaN)
        out = []
        for v in values:
            b = f32_bits(v)
            if math.isnan(v):
                out.append(0x7FC0)
            else:
                out.append(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF)
        return struct.pack(f"<{len(out)}H", *out)
    raise ValueError(dtype)


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, flat values). Header padded with spaces to 8 bytes."""
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, values in tensors:
        b = pack(dtype, values)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def peft_config(r, alpha, targets, **kw):
    c = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny-llama", "bias": "none",
         "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
         "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
         "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
         "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None, "target_modules": targets,
         "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}
    c.update(kw)
    return c


def lora_tensors(rng, modules, dtype, rank_of=lambda layer, m: 2, fifo=False, adapter_name=""):
    """modules: list of (layer, module). PEFT keys; A [r, d_in], B [d_out, r] ([d_in, r], [r, d_out] with fifo)."""
    out = []
    suffix = f".{adapter_name}" if adapter_name else ""
    for layer, m in modules:
        parent, din, dout = SITE[m]
        r = rank_of(layer, m)
        pre = f"base_model.model.model.layers.{layer}.{parent}.{m}"
        a_shape, b_shape = ([din, r], [r, dout]) if fifo else ([r, din], [dout, r])
        a = [round(rng.uniform(-0.5, 0.5), 3) for _ in range(r * din)]
        b = [round(rng.uniform(-0.5, 0.5), 3) for _ in range(dout * r)]
        out.append((f"{pre}.lora_A{suffix}.weight", dtype, a_shape, a))
        out.append((f"{pre}.lora_B{suffix}.weight", dtype, b_shape, b))
    return out


def peft_input(cfg, tensors):
    c = json.dumps(cfg, indent=2).encode()
    return struct.pack("<I", len(c)) + c + safetensors(tensors, {"format": "pt"})


def peft_seeds():
    t = "peft_adapter"
    reset(t)
    rng = random.Random(1234)
    both = lambda *mods: [(l, m) for l in range(N_LAYERS) for m in mods]
    write(t, "f32_qv.bin", peft_input(peft_config(4, 8, ["q_proj", "v_proj"]),
                                      lora_tensors(rng, both("q_proj", "v_proj"), "F32", lambda l, m: 4)))
    all_mods = [m for m, *_ in SITES]
    write(t, "f16_all_sites_layer0.bin",
          peft_input(peft_config(2, 4, all_mods, layers_to_transform=[0]),
                     lora_tensors(rng, [(0, m) for m in all_mods], "F16")))
    write(t, "bf16_regex_rslora.bin",
          peft_input(peft_config(2, 16, r"model\.layers\.\d+\.(self_attn\.(q|o)_proj|mlp\.down_proj)", use_rslora=True),
                     lora_tensors(rng, both("q_proj", "o_proj", "down_proj"), "BF16")))
    ranks = {"q_proj": 4, "model.layers.1.mlp.up_proj": 3}
    rank_of = lambda l, m: 3 if (l, m) == (1, "up_proj") else 4 if m == "q_proj" else 2
    write(t, "f32_rank_alpha_pattern.bin",
          peft_input(peft_config(2, 4, ["q_proj", "up_proj", "down_proj"], rank_pattern=ranks, alpha_pattern={"up_proj": 6}),
                     lora_tensors(rng, both("q_proj", "up_proj", "down_proj"), "F32", rank_of)))
    write(t, "f32_fan_in_fan_out.bin",
          peft_input(peft_config(2, 2, ["gate_proj", "k_proj"], fan_in_fan_out=True),
                     lora_tensors(rng, both("gate_proj", "k_proj"), "F32", fifo=True)))
    write(t, "f16_layer1_named.bin",
          peft_input(peft_config(2, 2, ["self_attn.v_proj", "mlp.down_proj"], layers_to_transform=1, modules_to_save=[]),
                     lora_tensors(rng, [(1, "v_proj"), (1, "down_proj")], "F16", adapter_name="default")))
    # Near-valid: one thing wrong each.
    base_cfg = lambda **kw: peft_config(2, 4, ["q_proj"], **kw)
    base_t = lambda: lora_tensors(rng, [(0, "q_proj")], "F32")
    write(t, "bad_dora.bin", peft_input(base_cfg(use_dora=True), base_t()))
    write(t, "bad_bias.bin", peft_input(base_cfg(bias="lora_only"), base_t()))
    write(t, "bad_modules_to_save.bin", peft_input(base_cfg(modules_to_save=["lm_head"]), base_t()))
    write(t, "bad_lm_head_target.bin", peft_input(peft_config(2, 4, ["q_proj", "lm_head"]), base_t()))
    write(t, "bad_rank.bin", peft_input(peft_config(3, 4, ["q_proj"]), base_t()))
    write(t, "bad_layer.bin", peft_input(base_cfg(layers_to_transform=[5]), base_t()))
    tens = base_t()
    write(t, "bad_missing_b.bin", peft_input(base_cfg(), tens[:1]))
    name, dt, shape, vals = tens[0]
    write(t, "bad_shape.bin", peft_input(base_cfg(), [(name, dt, [2, 8], vals[:16]), tens[1]]))
    write(t, "bad_nan.bin", peft_input(base_cfg(), [(name, dt, shape, [float("nan")] + vals[1:]), tens[1]]))
    write(t, "bad_untargeted.bin", peft_input(base_cfg(layers_to_transform=[0]), tens + lora_tensors(rng, [(1, "k_proj")], "F32")))
    write(t, "bad_extra_tensor.bin",
          peft_input(base_cfg(), tens + [("base_model.model.lm_head.lora_A.weight", "F32", [2, 16], [0.0] * 32)]))
    write(t, "bad_regex.bin", peft_input(peft_config(2, 4, "model\\.layers\\.(\\d+\\.self_attn\\.q_proj"), base_t()))


if __name__ == "__main__":
    tokenizer_seeds()
    bundle_seeds()
    peft_seeds()
    for t in ("tokenizer_json", "bundle_manifest", "peft_adapter"):
        d = os.path.join(SEEDS, t)
        print(f"{d}: {len(os.listdir(d))} seeds, {sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))} bytes")
