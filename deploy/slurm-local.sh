#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for trying and testing the sbatch
# template (deploy/slurm/atmoe.sbatch) without a cluster. Debian 12, as root; no systemd
# needed: the daemons are started directly.
#
#   deploy/slurm-local.sh start    install slurm-wlm + munge if missing, write the config,
#                                  start munged, slurmctld and slurmd, wait for the node to
#                                  be idle; prints the slurm.conf path on stdout
#   deploy/slurm-local.sh stop     cancel this cluster's jobs, stop the daemons it started
#   deploy/slurm-local.sh status   daemons and `sinfo`; exit 0 when the node takes jobs
#
# Clients find the cluster through SLURM_CONF:
#   export SLURM_CONF="$(deploy/slurm-local.sh start)"; sinfo; sbatch ...
#
# Everything but the packages and munge's key lives under $ATMOE_CACHE/slurm (default
# <repo>/.cache/slurm, ignored by git): slurm.conf, state/, spool/, log/ (daemon logs and
# jobcomp.log, one line per finished job), run/ (pid files). munged is the system's
# (/etc/munge/munge.key, /run/munge): reused when one already answers, otherwise started
# here and stopped by `stop`.
#
# The node: NodeName=$(hostname -s) at 127.0.0.1, CPUs=$(nproc), RealMemory = MemTotal
# less 5% (at least 256 MiB) so slurmd never finds less than configured; one partition
# `local`. ProctrackType=proctrack/linuxproc and TaskPlugin=task/none: no cgroups, so jobs
# are not confined to their CPUs (fine for tests; real clusters use task/cgroup).
# MinJobAge=5 keeps `sbatch --wait` polling every 2 s (it backs off to 32 s when
# MinJobAge is large); finished jobs stay in log/jobcomp.log (no slurmdbd, so no sacct).
#
# Knobs: ATMOE_SLURM_DIR (state dir), ATMOE_SLURM_WAIT (seconds to wait for the node,
# default 60), ATMOE_SLURMCTLD_PORT / ATMOE_SLURMD_PORT (default 6817 / 6818).
# Exit codes: 0 ok, 1 failed (the reason on stderr), 3 Slurm cannot be installed or run
# here (not root, or apt failed) — tests skip on 3.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SLURM_DIR="${ATMOE_SLURM_DIR:-$CACHE/slurm}"
CONF="$SLURM_DIR/slurm.conf"
RUN="$SLURM_DIR/run"
LOGS="$SLURM_DIR/log"
WAIT="${ATMOE_SLURM_WAIT:-60}"
NODE="$(hostname -s)"
MUNGE_OURS="$RUN/munged.ours"  # present when this script started munged
export SLURM_CONF="$CONF"

die() { log "slurm-local: $*"; exit 1; }
cannot() { log "slurm-local: $*"; exit 3; }

# pid_alive PIDFILE COMM: the pid in PIDFILE runs and its command name is COMM.
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# stop_pid PIDFILE COMM NAME: SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
  local pid
  pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  log "stopping $3 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    [ -d "/proc/$pid" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ]; then
    log "$3 did not exit in 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null && command -v munge >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get to install ${missing[*]}"
  log "installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$LOGS/apt.log" 2>&1 \
    || cannot "apt-get install ${missing[*]} failed (see $LOGS/apt.log)"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    install -d -m 0700 -o munge -g munge /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  if munge_ok; then return 0; fi
  install -d -m 0755 -o munge -g munge /run/munge
  install -d -m 0700 -o munge -g munge /var/log/munge
  install -d -m 0711 -o munge -g munge /var/lib/munge
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  touch "$MUNGE_OURS"
  for _ in $(seq 1 50); do
    munge_ok && return 0
    sleep 0.2
  done
  die "munged runs but does not answer 'munge -n | unmunge' (see /var/log/munge/munged.log)"
}

write_conf() {
  local cpus mem_kb mem_mb margin tmp
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  mem_mb=$((mem_kb / 1024))
  margin=$((mem_mb / 20))
  [ "$margin" -ge 256 ] || margin=256
  tmp="$CONF.new"
  cat >"$tmp" <<EOF
# Written by deploy/slurm-local.sh: a single-node cluster on $NODE. Regenerated on start.
ClusterName=atmoe-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${ATMOE_SLURMCTLD_PORT:-6817}
SlurmdPort=${ATMOE_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=5
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$((mem_mb - margin)) State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1  # unchanged
  fi
  mv "$tmp" "$CONF"
  return 0
}

node_state() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n1; }

# slurmd_registered_since T: the node's slurmd registered at or after epoch second T
# (a state recovered from an earlier run can say idle before the new slurmd answers).
slurmd_registered_since() {
  local t
  t=$(scontrol show node "$NODE" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
  [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge "$1" ]
}

# wait_for_node [T]: until the node takes jobs (and, with T, its slurmd registered since T).
wait_for_node() {
  local start=$SECONDS deadline=$((SECONDS + WAIT)) st="" resumed=0 since="${1:-}" d
  while [ $SECONDS -lt $deadline ]; do
    # A daemon that exited (bad config, port taken) fails now, not at the deadline.
    for d in slurmctld slurmd; do
      if [ $((SECONDS - start)) -ge 2 ] && ! pid_alive "$RUN/$d.pid" $d; then
        log "slurm-local: $d exited; last lines of $LOGS/$d.log:"
        tail -n 8 "$LOGS/$d.log" >&2 2>/dev/null || true
        exit 1
      fi
    done
    st=$(node_state)
    [ -z "$since" ] || slurmd_registered_since "$since" || st="${st:-unk} (slurmd not registered yet)"
    case "$st" in
      idle | mix | alloc | comp) return 0 ;;
      down | drain | drng | inval | fail)
        # A node recovered from an earlier run's state may stay down/drained: resume it once.
        if [ $resumed -eq 0 ]; then
          scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi
        ;;
    esac
    sleep 0.5
  done
  log "slurm-local: node $NODE is not idle after ${WAIT} s (sinfo state: '${st:-no answer}')"
  sinfo -N -l >&2 2>/dev/null || true
  scontrol show node "$NODE" 2>/dev/null | grep -E 'State=|Reason=' >&2 || true
  for f in slurmctld slurmd; do
    [ -f "$LOGS/$f.log" ] && { log "last lines of $LOGS/$f.log:"; tail -n 8 "$LOGS/$f.log" >&2; }
  done
  exit 1
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || cannot "needs root (the daemons run as root, SlurmUser=root)"
  mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$RUN" "$LOGS"
  install_packages
  start_munge
  if write_conf; then
    # A new or changed config: daemons of an older one restart on it.
    if pid_alive "$RUN/slurmctld.pid" slurmctld || pid_alive "$RUN/slurmd.pid" slurmd; then
      log "slurm.conf changed: restarting the daemons"
      stop_pid "$RUN/slurmd.pid" slurmd slurmd
      stop_pid "$RUN/slurmctld.pid" slurmctld slurmctld
    fi
  fi
  if ! pid_alive "$RUN/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    slurmctld -f "$CONF" || die "slurmctld did not start (see $LOGS/slurmctld.log)"
  fi
  local since=""
  if ! pid_alive "$RUN/slurmd.pid" slurmd; then
    log "starting slurmd (node $NODE)"
    since=$(($(date +%s) - 1))
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start (see $LOGS/slurmd.log)"
  fi
  wait_for_node "$since"
  log "cluster up: node $NODE $(node_state); export SLURM_CONF=$CONF"
  echo "$CONF"
}

cmd_stop() {
  if pid_alive "$RUN/slurmctld.pid" slurmctld; then
    # Jobs first, so no slurmstepd or job process outlives the daemons.
    local jobs
    jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 60); do
        [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  stop_pid "$RUN/slurmd.pid" slurmd slurmd
  stop_pid "$RUN/slurmctld.pid" slurmctld slurmctld
  if [ -f "$MUNGE_OURS" ]; then
    stop_pid /run/munge/munged.pid munged munged
    rm -f "$MUNGE_OURS"
  fi
  log "stopped"
}

cmd_status() {
  local ok=0 st
  if munge_ok; then log "munged: running"; else log "munged: not answering"; ok=1; fi
  local d
  for d in slurmctld slurmd; do
    if pid_alive "$RUN/$d.pid" $d; then log "$d: running (pid $(cat "$RUN/$d.pid"))"; else log "$d: not running"; ok=1; fi
  done
  if [ $ok -eq 0 ]; then
    sinfo >&2 || ok=1
    st=$(node_state)
    case "$st" in idle | mix | alloc | comp) ;; *) ok=1 ;; esac
    log "SLURM_CONF=$CONF"
  fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
