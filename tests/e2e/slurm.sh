#!/usr/bin/env bash
# End-to-end on a real single-node Slurm cluster (deploy/slurm-local.sh): the sbatch
# template (deploy/slurm/atmoe.sbatch) runs `atmoe generate` on TASKS MPI ranks and its
# output is byte-for-byte what one plain process prints; a 2-element array job reads one
# prompt per element; scancel ends a running job with nothing left behind.
#   tests/e2e/slurm.sh ATMOE_BINARY WORK_DIR
# Needs root. Exit 77 (skip) only when Slurm cannot be installed or run here.
# ATMOE_E2E_SLURM_TASKS (default 2): MPI ranks per job.
set -u
BIN="$(readlink -f "$1")"
WORK="$2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SBATCH_SCRIPT="$ROOT/deploy/slurm/atmoe.sbatch"
TASKS="${ATMOE_E2E_SLURM_TASKS:-2}"
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK" || exit 1
fail=0
ok() { printf 'ok   %s\n' "$1"; }
bad() { printf 'FAIL %s\n' "$1"; fail=1; }
t0=$SECONDS

# The cluster: stopped at the end unless it was already up before this test.
was_up=0
"$ROOT/deploy/slurm-local.sh" status >/dev/null 2>&1 && was_up=1
SLURM_CONF="$("$ROOT/deploy/slurm-local.sh" start 2>"$WORK/start.err")"
rc=$?
if [ $rc -eq 3 ]; then
  echo "SKIP: Slurm cannot be installed or run here: $(tail -n 1 "$WORK/start.err")"
  exit 77
fi
if [ $rc -ne 0 ]; then
  echo "FAIL deploy/slurm-local.sh start (exit $rc):"
  cat "$WORK/start.err"
  exit 1
fi
export SLURM_CONF
TAG="e2e$$"  # job names start with it; what is left of them is cancelled at the end
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  local left
  left=$(squeue -h -o '%i %j' 2>/dev/null | awk -v t="$TAG-" 'index($2, t) == 1 {print $1}' | xargs)
  # shellcheck disable=SC2086  # one argument per job id
  [ -z "$left" ] || scancel $left 2>/dev/null
  [ "$was_up" -eq 1 ] || "$ROOT/deploy/slurm-local.sh" stop >/dev/null 2>&1
}
trap cleanup EXIT
ok "local cluster up ($(sinfo -h -o '%P %t %C' | head -n1)) in $((SECONDS - t0)) s"
JOBCOMP="$(scontrol show config | sed -n 's/^JobCompLoc *= *//p')"

# jobcomp_state JOBID: "STATE EXITCODE" of a finished job, from the jobcomp log (the
# cluster has no slurmdbd, so no sacct; scontrol forgets jobs after MinJobAge).
jobcomp_state() {
  sed -n "s/^JobId=$1 .* JobState=\([A-Z_]*\) .* ExitCode=\([0-9:]*\).*/\1 \2/p" "$JOBCOMP" | tail -n 1
}
# wait_state JOBID STATE SECONDS: until the jobcomp log has JOBID in STATE.
wait_state() {
  local end=$((SECONDS + $3))
  while [ $SECONDS -lt $end ]; do
    case "$(jobcomp_state "$1")" in "$2"*) return 0 ;; esac
    sleep 0.5
  done
  return 1
}
# job_pids JOBID: processes that belong to the job (SLURM_JOB_ID in their environment).
job_pids() {
  grep -lzx "SLURM_JOB_ID=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
}
# atmoe_pids JOBID: those of them that are this atmoe binary.
atmoe_pids() {
  local p
  for p in $(job_pids "$1"); do
    [ "$(readlink -f "/proc/$p/exe" 2>/dev/null)" = "$BIN" ] && echo "$p"
  done
}
show_log() { for f in "$@"; do [ -f "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done; }

# A tiny model and bundle; reference outputs from one plain process. --b-std 0.5 makes the
# experts change the greedy text (checked below), so an expert delta lost or wrong across
# ranks shows in the comparison.
"$BIN" synth-model --out "$WORK/m" --seed 7 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 96 --vocab 320 2>/dev/null \
  && "$BIN" synth-bundle --base "$WORK/m" --out "$WORK/bun" --groups 3 --experts-per-group 2 --rank 4 --seed 3 \
    --b-std 0.5 2>/dev/null \
  || { echo "FAIL synth-model/synth-bundle"; exit 1; }
printf 'Hello world' >"$WORK/p0.txt"
printf 'The law says' >"$WORK/p1.txt"
GEN_ARGS=(--max-tokens 16 --temperature 0 --ignore-eos)
for i in 0 1; do
  "$BIN" generate --bundle "$WORK/bun" --prompt-file "$WORK/p$i.txt" "${GEN_ARGS[@]}" >"$WORK/ref$i.txt" 2>"$WORK/ref$i.err" \
    || { echo "FAIL single-process generate: $(cat "$WORK/ref$i.err")"; exit 1; }
done
"$BIN" generate --bundle "$WORK/bun" --routing off --prompt-file "$WORK/p0.txt" "${GEN_ARGS[@]}" >"$WORK/off0.txt" 2>/dev/null
if [ -s "$WORK/ref0.txt" ] && ! cmp -s "$WORK/ref0.txt" "$WORK/ref1.txt" && ! cmp -s "$WORK/ref0.txt" "$WORK/off0.txt"; then
  ok "single-process references (the experts change the text)"
else
  bad "single-process references are empty, equal, or the same as --routing off"
fi

# submit NAME SBATCH_OPTIONS... -- TEMPLATE_VARIABLES (NAME=VALUE,...): sbatch --wait, 60 s at most.
submit_wait() {
  local name="$1" vars="$2"
  shift 2
  timeout 60 sbatch --parsable --wait --job-name="$TAG-$name" --ntasks="$TASKS" --cpus-per-task=1 \
    --output="$WORK/$name-%j.log" --export="ALL,ATMOE_JOB_BIN=$BIN,ATMOE_JOB_BUNDLE=$WORK/bun,$vars" \
    "$@" "$SBATCH_SCRIPT" "${GEN_ARGS[@]}" 2>"$WORK/$name.sbatch.err"
}

# 1. One job on TASKS ranks: rank 0's output is the single-process text.
t1=$SECONDS
jid=$(submit_wait single "ATMOE_JOB_PROMPTS=$WORK/p0.txt,ATMOE_JOB_OUTPUT=$WORK/single.txt")
rc=$?
jid="${jid%%;*}"
st=$(jobcomp_state "$jid")
if [ $rc -eq 0 ] && [ "$st" = "COMPLETED 0:0" ]; then ok "job $jid ($TASKS tasks) COMPLETED, exit 0, in $((SECONDS - t1)) s"
else
  bad "job '$jid' ($TASKS tasks): sbatch exit $rc, jobcomp '$st'"
  show_log "$WORK/single.sbatch.err" "$WORK"/single-*.log
fi
if cmp -s "$WORK/ref0.txt" "$WORK/single.txt"; then ok "job output equals the single-process output"
else
  bad "job output differs from the single-process output"
  echo "--- single process:"; cat "$WORK/ref0.txt"; echo "--- job ($TASKS tasks):"; cat "$WORK/single.txt" 2>/dev/null
fi

# 2. A 2-element array job: element K reads p K.txt and writes array-K.txt.
t1=$SECONDS
jid=$(submit_wait array "ATMOE_JOB_PROMPTS=$WORK/p%a.txt,ATMOE_JOB_OUTPUT=$WORK/array-%a.txt" --array=0-1)
rc=$?
jid="${jid%%;*}"
states=$(grep -E "^JobId=[0-9]+ .* ArrayJobId=$jid " "$JOBCOMP" 2>/dev/null | sed -n 's/.* JobState=\([A-Z_]*\) .* ExitCode=\([0-9:]*\).*/\1 \2/p' | sort | uniq -c | xargs)
if [ $rc -eq 0 ] && [ "$states" = "2 COMPLETED 0:0" ]; then ok "array job $jid: 2 elements COMPLETED, exit 0, in $((SECONDS - t1)) s"
else
  bad "array job '$jid': sbatch exit $rc, jobcomp states '$states'"
  show_log "$WORK/array.sbatch.err" "$WORK"/array-*.log
fi
for i in 0 1; do
  if cmp -s "$WORK/ref$i.txt" "$WORK/array-$i.txt"; then ok "array element $i: output equals the single-process output for p$i"
  else
    bad "array element $i: output differs"
    echo "--- single process:"; cat "$WORK/ref$i.txt"; echo "--- element $i:"; cat "$WORK/array-$i.txt" 2>/dev/null
  fi
done

# 3. scancel of a running job: CANCELLED, and none of its processes left. The job runs a
# copy of the model with a long context and generates until it is cancelled.
t1=$SECONDS
"$BIN" synth-model --out "$WORK/m_long" --seed 7 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 96 --vocab 320 \
  --max-position 400000 2>/dev/null
jid=$(sbatch --parsable --job-name="$TAG-cancel" --ntasks="$TASKS" --cpus-per-task=1 --output="$WORK/cancel-%j.log" \
  --export="ALL,ATMOE_JOB_BIN=$BIN,ATMOE_JOB_BUNDLE=$WORK/bun,ATMOE_JOB_PROMPTS=$WORK/p0.txt,ATMOE_JOB_OUTPUT=$WORK/cancel.txt" \
  "$SBATCH_SCRIPT" --model "$WORK/m_long" --max-tokens 390000 --temperature 0 --ignore-eos 2>"$WORK/cancel.sbatch.err")
jid="${jid%%;*}"
running=0
for _ in $(seq 1 60); do
  [ "$(atmoe_pids "$jid" | wc -l)" -ge "$TASKS" ] && { running=1; break; }
  sleep 0.5
done
if [ $running -eq 1 ]; then
  ok "job $jid running: $(atmoe_pids "$jid" | wc -l) atmoe rank(s) after $((SECONDS - t1)) s"
  t1=$SECONDS
  scancel "$jid"
  wait_state "$jid" CANCELLED 30 && ok "scancel: job $jid CANCELLED in $((SECONDS - t1)) s" \
    || bad "scancel: job $jid not CANCELLED (jobcomp '$(jobcomp_state "$jid")', squeue '$(squeue -h -j "$jid" -o %T 2>/dev/null)')"
  left=""
  for _ in $(seq 1 20); do
    left=$(job_pids "$jid" | xargs)
    [ -z "$left" ] && break
    sleep 0.5
  done
  [ -z "$left" ] && ok "scancel: no process of job $jid left" \
    || bad "scancel: processes of job $jid left: $(for p in $left; do printf '%s(%s) ' "$p" "$(cat /proc/"$p"/comm 2>/dev/null)"; done)"
else
  bad "job '$jid' never ran $TASKS atmoe rank(s) (state '$(squeue -h -j "$jid" -o %T 2>/dev/null)')"
  show_log "$WORK/cancel.sbatch.err" "$WORK"/cancel-*.log
fi

# 4. atmoe batch as an array job (deploy/slurm/atmoe-batch-array.sbatch): 3 shards of 9
# requests cover each custom_id once, with the single-process text; then scancel of a
# running shard and a resubmission that resumes it: every id once, no torn line.
BATCH_SCRIPT="$ROOT/deploy/slurm/atmoe-batch-array.sbatch"
: >"$WORK/req.jsonl"
for i in 0 1 2 3 4 5 6 7 8; do
  printf '{"custom_id": "q%d", "method": "POST", "url": "/v1/completions", "body": {"model": "bun", "prompt": "Hello world", "max_tokens": 16, "temperature": 0, "ignore_eos": true}}\n' "$i" >>"$WORK/req.jsonl"
done
t1=$SECONDS
msg=""
jid=$(timeout 90 sbatch --parsable --wait --job-name="$TAG-batch" --array=0-2 --ntasks=1 --cpus-per-task=1 \
  --output="$WORK/batch-%A_%a.log" \
  --export="ALL,ATMOE_JOB_BIN=$BIN,ATMOE_JOB_BUNDLE=$WORK/bun,ATMOE_JOB_INPUT=$WORK/req.jsonl,ATMOE_JOB_OUTPUT_DIR=$WORK/bres" \
  "$BATCH_SCRIPT" --max-running 1 2>"$WORK/batch.sbatch.err")
rc=$?
jid="${jid%%;*}"
want_text=$(python3 -c 'import sys; print(open(sys.argv[1]).read()[:-1], end="")' "$WORK/ref0.txt")
check_batch() {  # check_batch N FILES...: N lines in all, each id once, each the reference text
  local n="$1"
  shift
  python3 - "$n" "$want_text" "$@" <<'PY'
import json, sys
n, want, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
ids, bad = [], []
for f in files:
    data = open(f, "rb").read()
    if data and not data.endswith(b"\n"):
        bad.append(f"{f}: torn last line")
    for l in data.decode().splitlines():
        j = json.loads(l)
        ids.append(j["custom_id"])
        if j["response"]["body"]["choices"][0]["text"] != want:
            bad.append(f"{j['custom_id']}: text differs")
if sorted(ids) != sorted(set(ids)) or len(ids) != n:
    bad.append(f"{len(ids)} lines, {len(set(ids))} ids, want {n}")
print("; ".join(bad))
sys.exit(1 if bad else 0)
PY
}
if [ $rc -eq 0 ] && msg=$(check_batch 9 "$WORK"/bres/results.shard*of3.jsonl); then
  ok "batch array job $jid: 3 shards, 9 ids once, single-process text, in $((SECONDS - t1)) s"
else
  bad "batch array job '$jid': sbatch exit $rc; $msg"
  show_log "$WORK/batch.sbatch.err" "$WORK"/batch-*.log
fi
# scancel mid-run, then the same submission resumes.
for i in 0 1 2 3 4 5; do
  printf '{"custom_id": "l%d", "method": "POST", "url": "/v1/completions", "body": {"model": "bun", "prompt": "Hello world", "max_tokens": 8000, "temperature": 0, "ignore_eos": true}}\n' "$i"
done >"$WORK/long.jsonl"
submit_long() {
  timeout 150 sbatch --parsable --job-name="$TAG-blong" --array=0-0 --ntasks=1 --cpus-per-task=1 --output="$WORK/blong-%A_%a.log" \
    --export="ALL,ATMOE_JOB_BIN=$BIN,ATMOE_JOB_BUNDLE=$WORK/bun,ATMOE_JOB_INPUT=$WORK/long.jsonl,ATMOE_JOB_OUTPUT_DIR=$WORK/lres" \
    "$@" "$BATCH_SCRIPT" --model "$WORK/m_long" --max-running 1 2>>"$WORK/blong.sbatch.err"
}
lout="$WORK/lres/results.shard0of1.jsonl"
jid=$(submit_long)
jid="${jid%%;*}"
for _ in $(seq 1 600); do
  [ -s "$lout" ] && break
  sleep 0.1
done
if [ -s "$lout" ]; then
  scancel "$jid"
  left="x"
  for _ in $(seq 1 40); do  # the array's processes: SLURM_ARRAY_JOB_ID in their environment
    left=$(grep -lzx "SLURM_ARRAY_JOB_ID=$jid" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | xargs)
    [ -z "$left" ] && break
    sleep 0.5
  done
  n1=$(grep -c '' "$lout")
  if [ -z "$left" ]; then ok "scancel of a batch shard after $n1 of 6 lines: nothing left running"
  else bad "scancel of a batch shard: processes left ($left)"; fi
  jid=$(submit_long --wait)
  rc=$?
  if [ $rc -eq 0 ] && [ "$n1" -lt 6 ] && python3 - "$lout" <<'PY'
import json, sys
data = open(sys.argv[1], "rb").read()
ids = [json.loads(l)["custom_id"] for l in data.decode().splitlines()]
sys.exit(0 if data.endswith(b"\n") and sorted(ids) == [f"l{i}" for i in range(6)] else 1)
PY
  then ok "resubmitted shard resumed: 6 ids once ($n1 written before scancel)"
  else bad "resubmitted shard: sbatch exit $rc, $n1 lines before scancel, output: $(wc -l <"$lout" 2>/dev/null)"
    show_log "$WORK/blong.sbatch.err" "$WORK"/blong-*.log
  fi
else
  bad "the long batch shard wrote no line in 60 s"
  show_log "$WORK/blong.sbatch.err" "$WORK"/blong-*.log
fi

echo "e2e_slurm: $((SECONDS - t0)) s, $TASKS task(s) per job"
exit $fail
