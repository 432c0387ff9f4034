#!/usr/bin/env bash
# Soak: ROUNDS times, `new` a default VM (1 GiB) and `cp` it the moment `new` returns. `cp`
# first waits for systemd to finish booting the source (see ARCHITECTURE.md), then forks a
# guest that has just booted, whose TCG translation cache is still filling and flushing.
# A round is clean when the fork took one attempt (`cp` silently retries a clone that woke
# with a crashed kernel: this counts that as a failure), both sides come up
# (`systemctl is-system-running --wait` over `ssh VM@HOST`), stay `running`, and show no oops,
# BUG, panic or segfault on their consoles. Reports how many rounds were clean.
# Run as root after `scripts/build release` and `nook image build default`:
#   bench/fork_fresh.sh [ROUNDS]        (default 6)
# NOOK_TCG_CACHE_MIB sets the cache (16 flushes it all the time); NOOK_IMAGES_DIR the images
# (default /var/cache/nook-test/images).
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-6}
nook=${NOOK_BIN:-$PWD/target/release/nook}
tmp=$(mktemp -d /var/tmp/nook-forkfresh.XXXX)
export NOOK_DATA_DIR=$tmp/data NOOK_IMAGES_DIR=${NOOK_IMAGES_DIR:-/var/cache/nook-test/images}
export NOOK_AGENT=${NOOK_AGENT:-$PWD/target/x86_64-unknown-linux-gnu/release/nook-guest-agent}
cleanup() {
  for v in $("$nook" vm list --json 2>/dev/null | python3 -c "import json,sys; [print(v['name']) for v in json.loads(sys.stdin.read() or '[]')]" 2>/dev/null); do
    "$nook" vm rm "$v" >/dev/null 2>&1 || true
  done
  kill "${nook_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true
  # QEMU outlives its daemon: end whatever the daemon could not remove.
  pkill -KILL -f -- "-name nook-.*$tmp/data" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
# One daemon owns the host's VM network at a time.
mkdir -p /run/nook; exec 9>/run/nook/system-tests.lock; flock 9
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
ssh_=(ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=60 -i "$tmp/key" -p "$port")
NOOK_SSH_ADDR=127.0.0.1:$port NOOK_HTTPS_ADDR=127.0.0.1:$(free_port) NOOK_VM_PORTS=off \
  "$nook" serve >"$tmp/nook.log" 2>&1 &
nook_pid=$!
for _ in $(seq 100); do "${ssh_[@]}" lobby@127.0.0.1 signup bench@example.com >/dev/null 2>&1 && break; sleep 0.1; done
kill -0 "$nook_pid" 2>/dev/null || { echo "nook serve did not start:" >&2; cat "$tmp/nook.log" >&2; exit 1; }
vm_field() { "$nook" vm list --json | python3 -c "import json,sys; print(next((v['$2'] for v in json.load(sys.stdin) if v['name']=='$1'), ''))"; }
clean=0
for i in $(seq "$rounds"); do
  "${ssh_[@]}" lobby@127.0.0.1 new --name "s$i" --memory 1G >/dev/null ||
    { echo "new failed:" >&2; tail -20 "$tmp/nook.log" >&2; exit 1; }
  good=1
  if ! out=$("$nook" vm cp "s$i" "c$i" --json 2>&1); then
    echo "round $i: cp failed: $out"; good=0
  elif ! attempts=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["timings"]["attempts"])') ||
       [ "$attempts" != 1 ]; then
    echo "round $i: the fork took ${attempts:-?} attempts (a clone woke broken and was forked again)"; good=0
  fi
  for v in "s$i" "c$i"; do
    [ $good = 1 ] || break
    answer=$(timeout 180 "${ssh_[@]}" "$v@127.0.0.1" 'sudo -n systemctl is-system-running --wait >/dev/null; echo alive' 2>&1)
    [[ $answer == *alive* ]] || { echo "round $i: $v did not answer: $answer"; good=0; }
    id=$(vm_field "$v" id)
    if [ -z "$id" ]; then echo "round $i: $v is gone"; good=0; continue; fi
    if grep -qiE "oops|BUG:|panic|general protection|segfault" "$NOOK_DATA_DIR/vms/$id/console.log"; then
      echo "round $i: $v's console:"; grep -iE -m3 "oops|BUG:|panic|general protection|segfault" "$NOOK_DATA_DIR/vms/$id/console.log"; good=0
    fi
    state=$(vm_field "$v" state); [ "$state" = running ] || { echo "round $i: $v is $state"; good=0; }
  done
  clean=$((clean + good))
  "$nook" vm rm "s$i" >/dev/null 2>&1; "$nook" vm rm "c$i" >/dev/null 2>&1
done
echo "TCG cache ${NOOK_TCG_CACHE_MIB:-128 (the default)} MiB: $clean of $rounds forks of a freshly booted default VM were clean (one attempt, both sides up)"
[ "$clean" = "$rounds" ]
