#!/usr/bin/env bash
# Runs atmoe on N MPI ranks on this machine: rank 0 the coordinator, ranks 1..N-1 expert
# workers; only rank 0 prints.
#
#   deploy/mpirun-local.sh [-n N] COMMAND [ARGS...]     (N defaults to 2)
#   deploy/mpirun-local.sh -n 3 generate --bundle DIR --prompt "Hello" --temperature 0
#
# = mpirun -n N --oversubscribe --bind-to none atmoe COMMAND ARGS..., with Open MPI's
# run-as-root variables set when run as root. --oversubscribe lets N exceed the cores
# Open MPI counts; --bind-to none because Open MPI otherwise pins each rank to one core
# (N <= 2) or one socket, while every rank runs its own pool of compute threads
# (ATMOE_THREADS; by default the node's cores / its ranks).
# Knobs: ATMOE_BIN (default $ATMOE_BUILD_DIR/apps/atmoe when built, else atmoe on PATH),
# ATMOE_MPIRUN (default mpirun), ATMOE_MPIRUN_ARGS (more mpirun options, word-split).
# For several machines, see deploy/hostfile.example; for Slurm, deploy/slurm/atmoe.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

n=2
if [ "${1:-}" = "-n" ] || [ "${1:-}" = "-np" ]; then
  n="${2:-}"
  shift 2 || true
fi
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { log "mpirun-local: -n wants a positive integer, got '$n'"; exit 2; }
[ $# -ge 1 ] || { echo "usage: $0 [-n N] COMMAND [ARGS...]   (an atmoe command: generate, bench, ...)" >&2; exit 2; }

bin="${ATMOE_BIN:-}"
if [ -z "$bin" ]; then
  if [ -x "$BUILD/apps/atmoe" ]; then bin="$BUILD/apps/atmoe"; else bin="$(command -v atmoe || true)"; fi
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  log "mpirun-local: no atmoe binary '${bin}' (build it with deploy/build.sh, or set ATMOE_BIN)"
  exit 2
fi
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
read -r -a extra <<<"${ATMOE_MPIRUN_ARGS:-}"
exec "${ATMOE_MPIRUN:-mpirun}" -n "$n" --oversubscribe --bind-to none "${extra[@]}" "$bin" "$@"
