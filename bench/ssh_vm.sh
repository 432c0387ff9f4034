#!/usr/bin/env bash
# Benchmark: `ssh VM@HOST true` (a command in a VM, through its guest agent) against
# `ssh HOST ls` (the lobby, which never leaves the host) on the same daemon, same client, same
# key. Reports medians and the ratio; the gap is what running the command in the guest costs.
# Run as root after `scripts/build release` and `nook image build IMAGE`:
#   bench/ssh_vm.sh [ROUNDS] [IMAGE]        (defaults: 20 rounds, the default image)
# NOOK_IMAGES_DIR picks the images (default /var/lib/nook/images); NOOK_BIN the nook binary.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-20}
image=${2:-default}
nook=${NOOK_BIN:-$PWD/target/release/nook}
tmp=$(mktemp -d /tmp/nook-sshvm.XXXX)
cleanup() {
  NOOK_DATA_DIR=$tmp/data "$nook" vm rm bench >/dev/null 2>&1 || true
  kill "${nook_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key")

# User-mode networking: commands go through the guest agent, so no taps or nftables are needed.
NOOK_DATA_DIR=$tmp/data NOOK_SSH_ADDR=127.0.0.1:$port NOOK_NET=user NOOK_HTTPS_ADDR=127.0.0.1:$(free_port) \
  NOOK_VM_PORTS=off "$nook" serve >"$tmp/nook.log" 2>&1 &
nook_pid=$!
for _ in $(seq 100); do ssh "${opts[@]}" -p "$port" lobby@127.0.0.1 signup bench@example.com >/dev/null 2>&1 && break; sleep 0.1; done
ssh "${opts[@]}" -p "$port" lobby@127.0.0.1 new --name bench --image "$image" >/dev/null
# A systemd guest is ready (agent and sshd) well before its boot ends; under TCG the rest of the
# boot takes the vCPU for a while. Measure the settled VM, as a user's later commands see it.
if [ "$image" = default ]; then
  ssh "${opts[@]}" -p "$port" bench@127.0.0.1 'sudo -n systemctl is-system-running --wait' >/dev/null || true
fi

time_runs() { # prints the median in ms
  for _ in $(seq "$rounds"); do
    local t0=$(date +%s%N); "$@" >/dev/null; local t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000 ))
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1000}'
}
vm_ms=$(time_runs ssh "${opts[@]}" -p "$port" bench@127.0.0.1 true)
lobby_ms=$(time_runs ssh "${opts[@]}" -p "$port" lobby@127.0.0.1 ls)
echo "nook 'ssh VM@HOST true' ($image image):  median ${vm_ms} ms over $rounds"
echo "nook lobby 'ssh HOST ls':                median ${lobby_ms} ms over $rounds"
awk -v a="$vm_ms" -v b="$lobby_ms" 'BEGIN { printf "ratio VM/lobby: %.2f\n", a/b }'
