#!/usr/bin/env python3
"""Convert a PEFT LoRA adapter (Llama-family base) into llama.cpp's GGUF LoRA format.

The output loads with ``llama-server --lora OUT.gguf`` / ``llama-completion --lora OUT.gguf``
on top of the base GGUF given with ``--base``. A torch-free stand-in for llama.cpp's
``convert_lora_to_gguf.py`` that supports just what the benchmarks need: LoRA on
q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj of a ``llama``-arch model.

Usage:
    python bench/peft_to_gguf_lora.py ADAPTER_DIR --base BASE.gguf -o OUT.gguf [--outtype f32|f16]

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors (PEFT layout).

Dependencies:
    * numpy
    * the ``gguf`` package from llama.cpp's source tree (gguf-py/). If it cannot be imported,
      the script looks for it under $LLAMA_CPP_DIR/gguf-py and then under
      .cache/llama/llama_cpp_python-*/vendor/llama.cpp/gguf-py in this repository.
      gguf-py needs pyyaml at import time (tqdm/requests are not needed here).
    * no torch and no ``safetensors`` package: the safetensors file is parsed by hand.
    For example:  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install numpy pyyaml

What the conversion does (mirrors convert_lora_to_gguf.py + convert_hf_to_gguf.py):
    * ``...layers.N.self_attn.q_proj.lora_A.weight`` -> ``blk.N.attn_q.weight.lora_a`` etc.
      Shapes stay as in PyTorch (lora_a [r, in], lora_b [out, r]); GGUF stores them
      reversed (ne = [in, r] and [r, out]), which is what llama.cpp expects.
    * convert_hf_to_gguf permutes the rows of Llama's q_proj / k_proj weights (HF rotary
      layout -> GGML's interleaved layout); for W + B@A only B's rows are permuted
      (LoraTorchTensor.permute in convert_lora_to_gguf.py). head counts come from the base
      GGUF (llama.attention.head_count / head_count_kv).
    * Scale: llama.cpp applies ``adapter.lora.alpha / rank`` (rank = each tensor's r),
      which equals PEFT's ``lora_alpha / r``. With ``use_rslora`` PEFT uses
      ``lora_alpha / sqrt(r)``: the extra factor sqrt(r) is folded into lora_b so that
      llama.cpp's alpha/r scale yields PEFT's scale exactly.
    * Refused: DoRA, alpha_pattern, fan_in_fan_out, bias/modules_to_save tensors, embedding
      or lm_head LoRA, lora_alpha == 0 (llama.cpp would read alpha 0 as "no scaling"), and
      tensors missing from the base model.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np


def _import_gguf():
    try:
        import gguf  # noqa: F401
        return gguf
    except ImportError:
        pass
    here = Path(__file__).resolve().parent.parent
    cands = []
    if os.environ.get("LLAMA_CPP_DIR"):
        cands.append(Path(os.environ["LLAMA_CPP_DIR"]) / "gguf-py")
    cands += [Path(p) for p in sorted(glob.glob(str(
        here / ".cache/llama/llama_cpp_python-*/vendor/llama.cpp/gguf-py")))]
    for c in cands:
        if (c / "gguf" / "__init__.py").is_file():
            sys.path.insert(0, str(c))
            import gguf
            return gguf
    sys.exit("error: cannot import the 'gguf' package; set LLAMA_CPP_DIR to a llama.cpp "
             "checkout or put its gguf-py/ on PYTHONPATH")


gguf = _import_gguf()

# HF Llama module -> GGUF tensor base name (block index filled in)
MODULE_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# architectures whose HF->GGUF conversion permutes q/k rows (LlamaModel.undo_permute = True)
PERMUTE_ARCHS = {"llama"}

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader: u64 header length, JSON header, raw little-endian data."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:
                sys.exit(f"error: unsupported safetensors dtype {info['dtype']} for {name}")
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = f.read(end - start)
            if dt == "bf16":
                arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<")).astype(np.float32)
            out[name] = arr.reshape(info["shape"])
    return out


def permute_rows(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """LlamaModel.permute from convert_hf_to_gguf, applied to the rows of w."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def read_base(path: Path):
    r = gguf.GGUFReader(str(path))

    def field(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    info = {
        "arch": arch,
        "n_head": int(field(f"{arch}.attention.head_count")),
        "n_head_kv": int(field(f"{arch}.attention.head_count_kv", field(f"{arch}.attention.head_count"))),
        # ggml ne order: [in, out]
        "shapes": {t.name: tuple(int(x) for x in t.shape) for t in r.tensors},
    }
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter_dir", type=Path, help="PEFT dir: adapter_config.json + adapter_model.safetensors")
    ap.add_argument("--base", type=Path, required=True, help="base model GGUF (for arch, head counts, shapes)")
    ap.add_argument("-o", "--outfile", type=Path, required=True, help="output GGUF LoRA file")
    ap.add_argument("--outtype", choices=["f32", "f16"], default="f32",
                    help="tensor type in the output (default f32, like convert_lora_to_gguf.py)")
    ap.add_argument("--no-permute", action="store_true",
                    help="TESTING ONLY: skip the q/k row permutation (produces a wrong adapter)")
    args = ap.parse_args(argv)

    cfg = json.loads((args.adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        sys.exit(f"error: peft_type {cfg.get('peft_type')} is not LORA")
    if cfg.get("use_dora"):
        sys.exit("error: DoRA adapters are not supported")
    if cfg.get("alpha_pattern"):
        sys.exit("error: alpha_pattern (per-module alpha) is not supported")
    if cfg.get("fan_in_fan_out"):
        sys.exit("error: fan_in_fan_out adapters are not supported")
    alpha = float(cfg["lora_alpha"])
    if alpha == 0:
        sys.exit("error: lora_alpha == 0 cannot be expressed (llama.cpp treats alpha 0 as scale 1)")
    rslora = bool(cfg.get("use_rslora", False))

    base = read_base(args.base)
    arch = base["arch"]
    if arch not in PERMUTE_ARCHS:
        sys.exit(f"error: base architecture '{arch}' is not supported (only {sorted(PERMUTE_ARCHS)})")
    n_head, n_head_kv = base["n_head"], base["n_head_kv"]

    tensors = read_safetensors(args.adapter_dir / "adapter_model.safetensors")
    pat = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        m = pat.match(name)
        if not m:
            sys.exit(f"error: unexpected tensor '{name}' (only lora_A/lora_B of linear layers are supported)")
        bid, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULE_MAP:
            sys.exit(f"error: unsupported target module '{module}' in '{name}'")
        dest = f"blk.{bid}.{MODULE_MAP[module]}.weight"
        pairs.setdefault(dest, {})[ab] = arr

    writer = gguf.GGUFWriter(str(args.outfile), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(args.adapter_dir.name)

    out_dt = np.float32 if args.outtype == "f32" else np.float16
    for dest in sorted(pairs, key=lambda s: (int(s.split(".")[1]), s)):
        p = pairs[dest]
        if set(p) != {"A", "B"}:
            sys.exit(f"error: {dest}: lora_A or lora_B missing")
        a, b = p["A"], p["B"]  # a: [r, in], b: [out, r]
        r = a.shape[0]
        if b.shape[1] != r:
            sys.exit(f"error: {dest}: rank mismatch A{a.shape} B{b.shape}")
        if dest not in base["shapes"]:
            sys.exit(f"error: {dest} does not exist in the base model")
        n_in, n_out = base["shapes"][dest][:2]
        if (a.shape[1], b.shape[0]) != (n_in, n_out):
            sys.exit(f"error: {dest}: adapter in/out {a.shape[1]}/{b.shape[0]} vs base {n_in}/{n_out}")
        if not args.no_permute:
            if dest.endswith(".attn_q.weight"):
                b = permute_rows(b, n_head, n_head)
            elif dest.endswith(".attn_k.weight"):
                b = permute_rows(b, n_head, n_head_kv)
        if rslora:
            # llama.cpp scales by alpha / r; PEFT rslora wants alpha / sqrt(r)
            b = b * math.sqrt(r)
        writer.add_tensor(dest + ".lora_a", np.ascontiguousarray(a, dtype=out_dt))
        writer.add_tensor(dest + ".lora_b", np.ascontiguousarray(b, dtype=out_dt))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.outfile}: {2 * len(pairs)} tensors, arch={arch}, alpha={alpha}, "
          f"rslora={rslora}, n_head={n_head}, n_head_kv={n_head_kv}, outtype={args.outtype}"
          + (", NO PERMUTE (testing)" if args.no_permute else ""))


if __name__ == "__main__":
    main()
