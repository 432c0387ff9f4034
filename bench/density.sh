#!/usr/bin/env bash
# Density benchmark: how many idle tiny-image VMs fit an account's 2 GiB envelope on this
# machine, and what each costs the host, with memory reclaim (balloon free page reporting,
# KSM, a 64 MiB TCG cache) and without. Firecracker's published VMM overhead is <= 5 MiB.
# Run as root after `scripts/build release`:  bench/density.sh [MAX_VMS]
set -euo pipefail
cd "$(dirname "$0")/.."
max=${1:-40}
nook=$PWD/target/release/nook
images=${NOOK_IMAGES_DIR:-/var/cache/nook-test/images}
agent=$PWD/target/x86_64-unknown-linux-gnu/release/nook-guest-agent
ksm_before=$(cat /sys/kernel/mm/ksm/run 2>/dev/null || echo 0)

run() { # $1 = true|false (reclaim)
  local reclaim=$1 tmp port pid n=0
  tmp=$(mktemp -d /tmp/nook-density.XXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$tmp/data"
  cat > "$tmp/data/nook.toml" <<CFG
plan_cpu = 2.0
plan_memory = "2G"
plan_disk = "1T"
plan_max_vms = 500
memory_overcommit = 100.0
reclaim = $reclaim
CFG
  [ "$reclaim" = false ] && echo 0 > /sys/kernel/mm/ksm/run 2>/dev/null || true
  ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
  local opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key" -p "$port")
  NOOK_DATA_DIR=$tmp/data NOOK_IMAGES_DIR=$images NOOK_AGENT=$agent NOOK_SSH_ADDR=127.0.0.1:$port NOOK_NET=user \
    "$nook" serve >"$tmp/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do ssh "${opts[@]}" lobby@127.0.0.1 signup density@example.com >/dev/null 2>&1 && break; sleep 0.1; done
  while [ "$n" -lt "$max" ]; do
    if ! ssh "${opts[@]}" lobby@127.0.0.1 new --image tiny --memory 128M --name "d$n" >/dev/null 2>"$tmp/err"; then
      echo "  VM $((n+1)) did not fit: $(head -c 300 "$tmp/err")"
      break
    fi
    n=$((n+1))
    # The envelope's cgroup OOM-kills a QEMU when real memory runs out.
    if NOOK_DATA_DIR=$tmp/data "$nook" vm list --json | grep -q '"failed"'; then
      echo "  a VM was killed at $n VMs: the envelope's memory is full"; n=$((n-1)); break
    fi
  done
  sleep 60 # let free page reporting, KSM and the idle knobs settle
  local mem ksm
  mem=$(NOOK_DATA_DIR=$tmp/data "$nook" metrics | awk '/^nook_account_memory_bytes/ {print $2}')
  ksm=$(cat /sys/kernel/mm/ksm/pages_sharing 2>/dev/null || echo 0)
  echo "reclaim=$reclaim: $n idle tiny VMs (128 MiB each) in a 2 GiB envelope;" \
    "account memory $((mem / 1048576)) MiB, $((mem / 1048576 / (n > 0 ? n : 1))) MiB per VM; KSM pages shared: $ksm"
  for v in $(seq 0 $((n - 1))); do NOOK_DATA_DIR=$tmp/data "$nook" vm rm "d$v" >/dev/null 2>&1 || true; done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$tmp"
}

run true
run false
echo "$ksm_before" > /sys/kernel/mm/ksm/run 2>/dev/null || true
echo "Firecracker's published VMM overhead: <= 5 MiB per microVM (excluding guest memory)."
