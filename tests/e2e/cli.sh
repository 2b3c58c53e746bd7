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
out2=$("$BIN" generate --model "$WORK/m" --prompt "Hello world" --max-tokens 8 --temperature 0 --ignore-eos --dtype f32 2>/dev/null)
[ "$out" = "$out2" ] && ok "greedy bf16 and f32 agree on the synth model" || ok "greedy bf16/f32 differ (allowed; informational)"
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
expect_input_error "no prompt" "prompt" -- "$BIN" generate --model "$WORK/m"
expect_input_error "prompt past the context" "context length" -- "$BIN" generate --model "$WORK/m" --prompt x --max-tokens 100000
"$BIN" generate --bogus >/dev/null 2>&1; [ $? -eq 2 ] && ok "unknown flag exits 2" || bad "unknown flag exits 2"
exit $fail
