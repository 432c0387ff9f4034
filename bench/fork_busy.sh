#!/usr/bin/env bash
# Benchmark and soundness check: `cp` of a running default VM (2 vCPUs, 1 GiB) whose guest
# writes /dev/urandom into tmpfs without pause, ROUNDS times. Counts clones that woke broken
# (`cp` had to fork again, failed, or the clone could not run `echo ok`) and reports the
# source's pause and `cp`'s time, medians over the rounds. Under TCG this is what QEMU 7.2
# got wrong before guest RAM had its two-page tail (ARCHITECTURE.md, "Clones").
# Run as root after `scripts/build release` and `nook image build default`:
#   bench/fork_busy.sh [ROUNDS]        NOOK_IMAGES_DIR picks the images.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-16}
nook=${NOOK_BIN:-$PWD/target/release/nook}
tmp=$(mktemp -d /var/tmp/nook-forkbusy.XXXX)
export NOOK_DATA_DIR=$tmp/data
cleanup() { kill "${nook_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; pkill -f "$tmp/data" || true; rm -rf "$tmp"; }
trap cleanup EXIT
# One daemon owns the host's VM network at a time.
mkdir -p /run/nook; exec 9>/run/nook/system-tests.lock; flock 9
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NOOK_SSH_ADDR=127.0.0.1:$(free_port) NOOK_HTTPS_ADDR=127.0.0.1:$(free_port) NOOK_VM_PORTS=off \
  "$nook" serve >"$tmp/daemon.log" 2>&1 &
nook_pid=$!
for _ in $(seq 100); do [ -S "$NOOK_DATA_DIR/nook.sock" ] && break; sleep 0.2; done
"$nook" vm new --image default --cpu 2 --memory 1G --name src --json >/dev/null
"$nook" vm exec src -- sh -c "nohup sh -c 'while :; do dd if=/dev/urandom of=/dev/shm/churn bs=1M count=64 2>/dev/null; done' >/dev/null 2>&1 &"
# With instant forks (the default, NOOK_FORK_MEMORY=own) the source moves into memory of its
# own in the background after each fork; until then a cp copies. Each round waits for that
# move, so every fork is instant, and the move (a live precopy of the busy guest) is checked
# as well. NOOK_FORK_MEMORY=copy measures copying forks.
qemu_pid() { cat "$NOOK_DATA_DIR/vms/$("$nook" vm list --json | python3 -c "import json,sys; print(next(v['id'] for v in json.load(sys.stdin) if v['name']=='$1'))")/qemu.pid"; }
own_ram() { grep -q 'rw-s .*memfd:nook-ram' "/proc/$(qemu_pid "$1")/maps" 2>/dev/null; }
broken=0; : >"$tmp/rounds"
for r in $(seq "$rounds"); do
  if [ "${NOOK_FORK_MEMORY:-own}" = own ]; then
    for _ in $(seq 150); do own_ram src && break; sleep 0.2; done
  fi
  if out=$("$nook" vm cp src "c$r" --json 2>&1) &&
     [ "$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["timings"]["attempts"])')" = 1 ] &&
     [ "$("$nook" vm exec "c$r" -- echo ok 2>/dev/null)" = ok ]; then
    echo "$out" | python3 -c 'import json,sys; t=json.load(sys.stdin)["timings"]; print(t["source_paused_ms"], t["total_ms"], t["memory_ms"])' >>"$tmp/rounds"
  else
    broken=$((broken + 1)); echo "round $r: broken: $out" >&2
  fi
  "$nook" vm rm "c$r" >/dev/null 2>&1 || true
done
python3 - "$tmp/rounds" "$rounds" "$broken" <<'PY'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
print(f"forks of a busy running default VM (2 vCPU, 1 GiB): {sys.argv[3]} broken of {sys.argv[2]}")
if rows:
    p, t, m = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    print(f"  source paused: median {statistics.median(p):.0f} ms ({min(p):.0f}-{max(p):.0f})")
    print(f"  cp total:      median {statistics.median(t):.0f} ms ({min(t):.0f}-{max(t):.0f})")
    print(f"  memory phase:  median {statistics.median(m):.0f} ms ({min(m):.0f}-{max(m):.0f})")
PY
