#!/usr/bin/env bash
# Benchmark: the web's latencies beside their baselines, in one run (bench/web.py):
#   - `ls` through the HTTPS API (cold: a connection per call; warm: keep-alive) vs `ssh HOST ls`;
#   - keystroke echo in the web terminal vs `ssh -tt VM@HOST`, p50/p99.
# Run as root after `scripts/build release` and `nook image build IMAGE`:
#   bench/web.sh [IMAGE]          (default: tiny; BENCH_ROUNDS, BENCH_KEYS set the counts)
# NOOK_IMAGES_DIR picks the images (default /var/lib/nook/images); NOOK_BIN the nook binary.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-tiny}
nook=${NOOK_BIN:-$PWD/target/release/nook}
tmp=$(mktemp -d /tmp/nook-web.XXXX)
cleanup() {
  NOOK_DATA_DIR=$tmp/data "$nook" vm rm bench >/dev/null 2>&1 || true
  kill "${nook_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); https=$(free_port)
ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key")
lobby() { ssh "${opts[@]}" -p "$port" lobby@127.0.0.1 "$@"; }

# User-mode networking: the terminal goes through the guest agent, so no taps are needed.
NOOK_DATA_DIR=$tmp/data NOOK_SSH_ADDR=127.0.0.1:$port NOOK_NET=user NOOK_HTTPS_ADDR=127.0.0.1:$https \
  NOOK_VM_PORTS=off "$nook" serve >"$tmp/nook.log" 2>&1 &
nook_pid=$!
for _ in $(seq 100); do lobby signup bench@example.com >/dev/null 2>&1 && break; sleep 0.1; done
lobby new --name bench --image "$image" >/dev/null
if [ "$image" = default ]; then
  ssh "${opts[@]}" -p "$port" bench@127.0.0.1 'sudo -n systemctl is-system-running --wait' >/dev/null || true
fi
token=$(lobby token create --api --cmds ls --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
login=$(lobby browser | grep -o 'token=[^ ]*' | head -1 | cut -d= -f2)
BENCH_HTTPS_PORT=$https BENCH_SSH_PORT=$port BENCH_TOKEN=$token BENCH_LOGIN_TOKEN=$login \
  BENCH_KEY=$tmp/key BENCH_CA=$(NOOK_DATA_DIR=$tmp/data "$nook" ca path) \
  python3 bench/web.py
