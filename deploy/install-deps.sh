#!/usr/bin/env bash
# Installs atmoe's build and test dependencies from Debian's packages. Idempotent: only
# missing packages are installed. Needs root (or sudo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PKGS=(build-essential cmake pkg-config git python3 python3-pip unzip
      libopenmpi-dev openmpi-bin libboost-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
      libopenblas-dev libcli11-dev libpcre2-dev libutf8proc-dev libgtest-dev libgmock-dev libbenchmark-dev
      clang libclang-rt-14-dev
      slurm-wlm munge)  # the local Slurm cluster of deploy/slurm-local.sh and the e2e_slurm test
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "dependencies already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
log "done"
