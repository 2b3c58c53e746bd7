#!/usr/bin/env bash
# End-to-end checks of the atmoe binary on real files: a synth-model generates; every
# bad input exits with code 2 and exactly one stderr line naming the file and problem.
set -u
BIN="$1"
WORK="$2"
rm -rf "$WORK" && mkdir -p "$WORK"
fail=0
ok() { printf 'ok   %s\n' "$1"; }
bad() { printf 'FAIL %s\n' "$1"; fail=1; }

# expect_input_error NAME PATTERN -- CMD...: exit code 2, one stderr line matching PATTERN, no core dump.
expect_input_error() {
  local name="$1" pat="$2"; shift 3
  "$@" >"$WORK/out" 2>"$WORK/err"
  local rc=$?
  local lines; lines=$(wc -l <"$WORK/err")
  if [ "$rc" -eq 2 ] && [ "$lines" -eq 1 ] && grep -q -- "$pat" "$WORK/err"; then ok "$name"
  else bad "$name (rc=$rc, $lines stderr lines: $(head -c 300 "$WORK/err"))"; fi
}

"$BIN" synth-model --out "$WORK/m" --seed 7 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 96 --vocab 320 2>/dev/null \
  && ok "synth-model" || bad "synth-model"
"$BIN" synth-model --out "$WORK/m2" --seed 7 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 96 --vocab 320 2>/dev/null
cmp -s "$WORK/m/model.safetensors" "$WORK/m2/model.safetensors" && cmp -s "$WORK/m/tokenizer.json" "$WORK/m2/tokenizer.json" \
  && ok "synth-model is deterministic" || bad "synth-model is deterministic"
out=$("$BIN" generate --model "$WORK/m" --prompt "Hello world" --max-tokens 8 --temperature 0 --ignore-eos 2>"$WORK/err")
[ $? -eq 0 ] && [ -n "$out" ] && [ ! -s "$WORK/err" ] && ok "generate prints only text on stdout" || bad "generate ($(cat "$WORK/err"))"
# f32 greedy text: non-empty and the same on a second run (bf16 and f32 may pick different
# tokens on a random synth model, so they are not compared with each other).
out2=$("$BIN" generate --model "$WORK/m" --prompt "Hello world" --max-tokens 8 --temperature 0 --ignore-eos --dtype f32 2>/dev/null)
out3=$("$BIN" generate --model "$WORK/m" --prompt "Hello world" --max-tokens 8 --temperature 0 --ignore-eos --dtype f32 2>/dev/null)
if [ -n "$out2" ] && [ "$out2" = "$out3" ]; then ok "greedy f32 is deterministic"; else bad "greedy f32: '$out2' then '$out3'"; fi
"$BIN" generate --model "$WORK/m" --prompt "a" --prompt "bb" --prompt "ccc" --max-tokens 4 --temperature 0.9 --seed 1 >/dev/null 2>&1 \
  && ok "generate with a batch of prompts" || bad "generate with a batch of prompts"
"$BIN" generate --model "$WORK/m" --chat --prompt "hi" --max-tokens 4 --temperature 0 >/dev/null 2>&1 && ok "generate --chat" || bad "generate --chat"
"$BIN" inspect "$WORK/m" | grep -q "arch=llama" && ok "inspect HF dir" || bad "inspect HF dir"
"$BIN" --help-env | grep -q ATMOE_THREADS && ok "--help-env" || bad "--help-env"

# Bad files.
mkdir -p "$WORK/b1" && cp "$WORK/m"/* "$WORK/b1/" && rm "$WORK/b1/tokenizer.json"
expect_input_error "missing tokenizer" "tokenizer.json" -- "$BIN" generate --model "$WORK/b1" --prompt x
mkdir -p "$WORK/b2" && cp "$WORK/m"/* "$WORK/b2/" && sed -i 's/"llama"/"gpt_neox"/' "$WORK/b2/config.json"
expect_input_error "unknown architecture" "gpt_neox" -- "$BIN" generate --model "$WORK/b2" --prompt x
mkdir -p "$WORK/b3" && cp "$WORK/m"/* "$WORK/b3/" && head -c 5000 "$WORK/m/model.safetensors" >"$WORK/b3/model.safetensors"
expect_input_error "truncated safetensors" "model.safetensors" -- "$BIN" inspect "$WORK/b3"
mkdir -p "$WORK/b4" && cp "$WORK/m"/* "$WORK/b4/" && printf '\xff\xff\xff\xff\xff\xff\x00\x00{}' >"$WORK/b4/model.safetensors"
expect_input_error "oversized safetensors header" "header length" -- "$BIN" inspect "$WORK/b4"
mkdir -p "$WORK/b5" && cp "$WORK/m"/* "$WORK/b5/" && sed -i 's/"hidden_size": 64/"hidden_size": 128/' "$WORK/b5/config.json"
expect_input_error "config that lies about shapes" "expected" -- "$BIN" inspect "$WORK/b5"
mkdir -p "$WORK/b6" && cp "$WORK/m"/* "$WORK/b6/" && echo '{"model_type": "llama",' >"$WORK/b6/config.json"
expect_input_error "config.json that is not JSON" "config.json" -- "$BIN" inspect "$WORK/b6"
printf 'GGUF\x03\x00\x00\x00' >"$WORK/t.gguf"
expect_input_error "truncated GGUF header" "t.gguf" -- "$BIN" inspect "$WORK/t.gguf"
printf 'NOPE\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' >"$WORK/m.gguf"
expect_input_error "GGUF with a bad magic" "bad magic" -- "$BIN" inspect "$WORK/m.gguf"
printf 'GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\x00\x01\x00\x00\x00\x00\x00\x00\x00' >"$WORK/l.gguf"
expect_input_error "GGUF with a lying tensor count" "tensor count" -- "$BIN" inspect "$WORK/l.gguf"
if [ -s "${ATMOE_TEST_MODEL:-}" ]; then
  head -c 3000000 "$ATMOE_TEST_MODEL" >"$WORK/trunc.gguf"
  expect_input_error "truncated real GGUF" "trunc.gguf" -- "$BIN" inspect "$WORK/trunc.gguf"
fi
expect_input_error "missing model path" "no such file" -- "$BIN" inspect "$WORK/does-not-exist"
expect_input_error "negative temperature" "temperature" -- "$BIN" generate --model "$WORK/m" --prompt x --temperature -1
expect_input_error "unknown dtype" "dtype" -- "$BIN" generate --model "$WORK/m" --prompt x --dtype f8
# --device: an unknown backend; cuda where this build or machine cannot run it (the CI
# machine has no GPU: refused with the reason); explicit cpu is the default path.
expect_input_error "unknown device" "unknown backend 'tpu'" -- "$BIN" generate --model "$WORK/m" --prompt x --device tpu
expect_input_error "bad cuda index" "device" -- "$BIN" generate --model "$WORK/m" --prompt x --device cuda:x
if "$BIN" inspect "$WORK/m" 2>/dev/null | grep -q "(--device cuda)$"; then
  ok "cuda usable here: --device cuda refusals not checked"
else
  expect_input_error "no usable cuda" "--device cuda" -- "$BIN" generate --model "$WORK/m" --prompt x --device cuda
  expect_input_error "no usable cuda (bench)" "--device cuda" -- "$BIN" bench --model "$WORK/m" --device cuda:1
fi
outc=$("$BIN" generate --model "$WORK/m" --prompt "Hello world" --max-tokens 8 --temperature 0 --ignore-eos --dtype f32 --device cpu 2>/dev/null)
[ "$outc" = "$out2" ] && ok "--device cpu is the default path" || bad "--device cpu: '$outc' vs '$out2'"
expect_input_error "no prompt" "prompt" -- "$BIN" generate --model "$WORK/m"
expect_input_error "prompt past the context" "context length" -- "$BIN" generate --model "$WORK/m" --prompt x --max-tokens 100000
# Bundles.
"$BIN" synth-bundle --base "$WORK/m" --out "$WORK/bun" --groups 3 --experts-per-group 2 --rank 4,8 --seed 3 --general 2>/dev/null \
  && ok "synth-bundle" || bad "synth-bundle"
"$BIN" inspect "$WORK/bun" | grep -q "group medicine" && ok "inspect BUNDLE" || bad "inspect BUNDLE"
base_out=$("$BIN" generate --model "$WORK/m" --prompt "Hello" --max-tokens 12 --temperature 0 --ignore-eos 2>/dev/null)
off_out=$("$BIN" generate --bundle "$WORK/bun" --routing off --prompt "Hello" --max-tokens 12 --temperature 0 --ignore-eos 2>/dev/null)
[ "$base_out" = "$off_out" ] && ok "--routing off prints the base model's text" || bad "--routing off ('$off_out' vs '$base_out')"
"$BIN" generate --bundle "$WORK/bun" --prompt "Hello" --max-tokens 6 --temperature 0 --trace "$WORK/trace.json" \
  --top-k-groups 2 --mask law-0 >/dev/null 2>&1 && python3 - "$WORK/trace.json" <<'PY' && ok "trace: groups sum to 1, masked expert at 0" || bad "trace"
import json, sys
t = json.load(open(sys.argv[1]))
assert len(t["layers"]) == 2
for l in t["layers"]:
    assert abs(sum(l["groups"].values()) - 1) < 1e-9, l
    assert l["experts"]["law-0"] == 0
    assert sum(1 for v in l["groups"].values() if v > 0) <= 2
PY
"$BIN" explain --bundle "$WORK/bun" --prompt "Hello there" --out "$WORK/r.svg" 2>/dev/null && python3 - "$WORK/r.svg" <<'PY' && ok "explain writes an SVG heatmap" || bad "explain"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
text = ET.tostring(root, encoding="unicode")
assert "medicine-0" in text and "law" in text
rects = [e for e in root.iter() if e.tag.endswith("rect")]
assert len(rects) > 2 * (6 + 3)   # layers x (experts + groups) cells
PY
# bench with a bundle, batch 1 only (it used to crash there) and the usual pair: at --batch 1
# the batch-1 lines only (base and experts, measured once a rep) and the batched JSON keys
# equal to the batch-1 ones; at --batch 2 the batched lines too.
for nb in 1 2; do
  "$BIN" bench --model "$WORK/m" --bundle "$WORK/bun" --batch $nb --reps 1 --prompt-tokens 8 --decode-tokens 2 \
    --json "$WORK/bench$nb.json" >"$WORK/out" 2>"$WORK/err"
  rc=$?
  if [ $rc -eq 0 ] && python3 - "$WORK/bench$nb.json" "$WORK/out" $nb <<'PY'; then ok "bench --bundle --batch $nb"
import json, re, sys
j, out, nb = json.load(open(sys.argv[1])), open(sys.argv[2]).read(), int(sys.argv[3])
assert j["batch"] == nb and j["decode_b1_tok_s"] > 0 and j["experts_decode_b1_tok_s"] > 0, j
assert len(j["samples"]["decode_b1"]) == 1 and len(j["samples"]["experts_b1"]) == 1, j["samples"]
lines = re.findall(r"^ *decode b=(\d+) ", out, re.M)
assert lines == (["1", "1"] if nb == 1 else ["1", "2", "1", "2"]), lines
if nb == 1:
    assert j["decode_batch_tok_s"] == j["decode_b1_tok_s"] and j["split_batch"] == j["split_b1"], j
else:
    assert len(j["samples"]["decode_batch"]) == 1 and j["decode_batch_tok_s"] > 0, j
PY
  else bad "bench --bundle --batch $nb (bench rc=$rc, $(head -c 300 "$WORK/err"))"; fi
done
"$BIN" bench --bundle "$WORK/bun" --batch 2 --reps 1 --prompt-tokens 8 --decode-tokens 2 2>/dev/null | grep -q "^model  *[^ ]" \
  && ok "bench --bundle alone names the bundle's base model" || bad "bench --bundle alone names the bundle's base model"
expect_input_error "bench --bundle --routing off" "bench --routing off" -- "$BIN" bench --bundle "$WORK/bun" --routing off
# Pins whose sum overflows a double: only their ratios count (they used to give NaN weights:
# garbage text from generate, a crash in explain's heatmap).
"$BIN" generate --bundle "$WORK/bun" --prompt "Hello" --max-tokens 4 --temperature 0 --pin medicine=1e308,law=1e308 \
  --trace "$WORK/pin_trace.json" >/dev/null 2>&1 && python3 -c "
import json, sys
t = json.load(open(sys.argv[1]))
for l in t['layers']:
    assert abs(l['groups']['medicine'] - 0.5) < 1e-12 and abs(l['groups']['law'] - 0.5) < 1e-12, l" "$WORK/pin_trace.json" \
  && ok "pins of 1e308 are normalised, not NaN" || bad "pins of 1e308"
"$BIN" explain --bundle "$WORK/bun" --prompt a --pin medicine-0=1e308,medicine-1=1e308 --out "$WORK/pin.svg" >/dev/null 2>&1 \
  && grep -q "<svg" "$WORK/pin.svg" && ! grep -qi "nan" "$WORK/pin.svg" && ok "explain with pins of 1e308" || bad "explain with pins of 1e308"
# fit-router targets whose sum overflows a double (every group still has examples).
python3 -c "
import json, sys
gs = ['medicine', 'law', 'code']
with open(sys.argv[1], 'w') as f:
    for i in range(12):
        f.write(json.dumps({'prompt': f't {i}', 'groups': {gs[i % 3]: 1e308, gs[(i + 1) % 3]: 1e308}}) + '\\n')" "$WORK/fit_big.jsonl"
"$BIN" fit-router --bundle "$WORK/bun" --data "$WORK/fit_big.jsonl" --out "$WORK/fit_big.safetensors" >/dev/null 2>"$WORK/err" \
  && [ -s "$WORK/fit_big.safetensors" ] && ok "fit-router with targets of 1e308" || bad "fit-router with targets of 1e308 ($(head -c 200 "$WORK/err"))"
expect_input_error "inspect --placement 0" "--placement 0: a job of 2..65536 ranks" -- "$BIN" inspect "$WORK/bun" --placement 0
expect_input_error "missing --placement-map file" "--placement-map: not found" -- "$BIN" inspect "$WORK/bun" --placement 2 --placement-map "$WORK/nope.json"
expect_input_error "unknown expert in --mask" "mask 'nope'" -- "$BIN" generate --bundle "$WORK/bun" --prompt x --mask nope
expect_input_error "pins that sum to zero" "pin" -- "$BIN" generate --bundle "$WORK/bun" --prompt x --pin medicine=0
expect_input_error "malformed --pin" "pin" -- "$BIN" generate --bundle "$WORK/bun" --prompt x --pin medicine
expect_input_error "top-k out of range" "top_k_groups" -- "$BIN" generate --bundle "$WORK/bun" --prompt x --top-k-groups 9
expect_input_error "negative tau" "tau_group" -- "$BIN" generate --bundle "$WORK/bun" --prompt x --tau-group -1
expect_input_error "unknown adapter" "adapter 'nope'" -- "$BIN" generate --bundle "$WORK/bun" --prompt x --adapter nope
mkbad() { rm -rf "$WORK/$1"; cp -r "$WORK/bun" "$WORK/$1"; }
mkbad nb1 && rm -rf "$WORK/nb1/experts/law-1"
expect_input_error "missing adapter dir" "law-1" -- "$BIN" generate --bundle "$WORK/nb1" --prompt x
"$BIN" synth-model --out "$WORK/m_other" --seed 7 --layers 2 --hidden 32 --heads 4 --kv-heads 2 --ffn 48 --vocab 320 2>/dev/null
"$BIN" synth-bundle --base "$WORK/m_other" --out "$WORK/bun_other" --groups 1 --experts-per-group 1 --seed 3 2>/dev/null
mkbad nb2 && rm -rf "$WORK/nb2/experts/code-0" && cp -r "$WORK/bun_other/experts/medicine-0" "$WORK/nb2/experts/code-0"
expect_input_error "adapter/base shape mismatch" "lora_A.weight' has shape" -- "$BIN" generate --bundle "$WORK/nb2" --prompt x
mkbad nb3 && cp "$WORK/bun_other/router.safetensors" "$WORK/nb3/router.safetensors"
expect_input_error "router tensor of the wrong shape" "router.safetensors: tensor 'layers.0.group_gate.weight'" -- "$BIN" generate --bundle "$WORK/nb3" --prompt x
mkbad nb4 && head -c 100 "$WORK/bun/router.safetensors" >"$WORK/nb4/router.safetensors"
expect_input_error "corrupt router.safetensors" "router.safetensors" -- "$BIN" generate --bundle "$WORK/nb4" --prompt x
mkbad nb5 && sed -i 's/"name": "law-1"/"name": "law-0"/' "$WORK/nb5/atmoe.json"
expect_input_error "duplicate expert names" "duplicate expert name 'law-0'" -- "$BIN" generate --bundle "$WORK/nb5" --prompt x
mkbad nb6 && sed -i 's|"adapter": "experts/law-1"|"adapter": "../bun/experts/law-1"|' "$WORK/nb6/atmoe.json"
expect_input_error "path outside the bundle" "leaves the bundle directory" -- "$BIN" generate --bundle "$WORK/nb6" --prompt x
mkbad nb7 && python3 -c "
import json,sys; p=sys.argv[1]; j=json.load(open(p)); j['groups'][1]['experts']=[]; json.dump(j,open(p,'w'))" "$WORK/nb7/atmoe.json"
expect_input_error "group with no experts" "group 'law' needs a non-empty list of experts" -- "$BIN" generate --bundle "$WORK/nb7" --prompt x
mkbad nb8 && sed -i 's|"adapter": "experts/law-1"|"adapter": "/etc"|' "$WORK/nb8/atmoe.json"
expect_input_error "absolute path in the bundle" "must be relative" -- "$BIN" generate --bundle "$WORK/nb8" --prompt x
mkbad nb9 && echo '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": true}' >"$WORK/nb9/experts/code-1/adapter_config.json"
expect_input_error "DoRA adapter refused" "DoRA" -- "$BIN" generate --bundle "$WORK/nb9" --prompt x

# T-REX bundles.
"$BIN" synth-bundle --base "$WORK/m" --out "$WORK/trex" --method t-rex --trex-mode rank1_flex --rank 4,2 --router-mapping \
  --seed 4 2>/dev/null && ok "synth-bundle --method t-rex" || bad "synth-bundle --method t-rex"
"$BIN" inspect "$WORK/trex" | grep -q "rank1_flex" && ok "inspect a t-rex bundle" || bad "inspect a t-rex bundle"
"$BIN" generate --bundle "$WORK/trex" --prompt "Hello" --max-tokens 5 --temperature 0 --trace "$WORK/ttrace.json" >/dev/null 2>&1 \
  && python3 -c "import json,sys; t=json.load(open(sys.argv[1])); assert t['method']=='t-rex' and len(t['intuition'])==32" "$WORK/ttrace.json" \
  && ok "t-rex generate with a hidden-state intuition and trace" || bad "t-rex generate"
t_off=$("$BIN" generate --bundle "$WORK/trex" --routing off --prompt "Hello" --max-tokens 12 --temperature 0 --ignore-eos 2>/dev/null)
[ "$t_off" = "$base_out" ] && ok "t-rex --routing off prints the base model's text" || bad "t-rex --routing off"
expect_input_error "t-rex pin-cluster out of range" "pin_cluster" -- "$BIN" generate --bundle "$WORK/trex" --prompt x --pin-cluster 99
expect_input_error "at-moe control on a t-rex bundle" "applies to at-moe bundles" -- "$BIN" generate --bundle "$WORK/trex" --prompt x --top-k-groups 1
"$BIN" synth-bundle --base "$WORK/m" --out "$WORK/trex_e" --method t-rex --trex-mode rank1 --rank 4 --intuition embedding \
  --embedding-dim 8 --seed 4 2>/dev/null
expect_input_error "t-rex without the request embedding" "intuition-embedding" -- "$BIN" generate --bundle "$WORK/trex_e" --prompt x
echo "[1, 2, 3]" >"$WORK/emb3.json"
expect_input_error "t-rex embedding of the wrong size" "8" -- "$BIN" generate --bundle "$WORK/trex_e" --prompt x --intuition-embedding "$WORK/emb3.json"
# Malformed JSON arrays are refused, not read as numbers between brackets.
for bad_emb in "[1, 0, 0, 0, 0, 0, 0, 0.5" "]1, 0, 0, 0, 0, 0, 0, 0.5[" "[[1, 0, 0, 0, 0, 0, 0, 0.5]]" "[1,, 0, 0, 0, 0, 0, 0, 0.5]" \
               "[1, 0, 0, 0, 0, 0, 0, 1e39]"; do
  printf '%s\n' "$bad_emb" >"$WORK/emb_bad.json"
  expect_input_error "t-rex embedding '$bad_emb'" "emb_bad.json" -- "$BIN" generate --bundle "$WORK/trex_e" --prompt x --intuition-embedding "$WORK/emb_bad.json"
done
printf '1 0 0 0\n0 0 0 0.5\n' >"$WORK/emb8.txt"
"$BIN" generate --bundle "$WORK/trex_e" --prompt x --max-tokens 3 --intuition-embedding "$WORK/emb8.txt" >/dev/null 2>&1 \
  && ok "t-rex embedding as whitespace-separated numbers" || bad "t-rex embedding as whitespace-separated numbers"
echo "[1, 0, 0, 0, 0, 0, 0, 0.5]" >"$WORK/emb8.json"
"$BIN" generate --bundle "$WORK/trex_e" --prompt x --max-tokens 3 --intuition-embedding "$WORK/emb8.json" >/dev/null 2>&1 \
  && ok "t-rex with a request embedding" || bad "t-rex with a request embedding"
rm -rf "$WORK/tb1"; cp -r "$WORK/trex" "$WORK/tb1"; rm "$WORK/tb1/centroids.safetensors"
expect_input_error "t-rex bundle without centroids" "centroids" -- "$BIN" generate --bundle "$WORK/tb1" --prompt x

"$BIN" generate --bogus >/dev/null 2>&1; [ $? -eq 2 ] && ok "unknown flag exits 2" || bad "unknown flag exits 2"
exit $fail
