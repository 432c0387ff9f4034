#!/usr/bin/env bash
# Benchmark: `ssh HOST ls` against nook's SSH lobby versus plain `ssh HOST true` against
# OpenSSH's sshd on the same machine, same client, same key type. Reports medians and the ratio.
# Run as root after `scripts/build release`:  bench/ssh_lobby.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-30}
nook=$PWD/target/release/nook
tmp=$(mktemp -d /tmp/nook-sshbench.XXXX)
cleanup() { kill "${nook_pid:-}" "${sshd_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nook_port=$(free_port); sshd_port=$(free_port)
ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key")

# nook, with user-mode networking so it does not touch the host's taps or nftables.
NOOK_DATA_DIR=$tmp/data NOOK_SSH_ADDR=127.0.0.1:$nook_port NOOK_NET=user "$nook" serve >"$tmp/nook.log" 2>&1 &
nook_pid=$!
for _ in $(seq 100); do ssh "${opts[@]}" -p "$nook_port" lobby@127.0.0.1 signup bench@example.com >/dev/null 2>&1 && break; sleep 0.1; done

# OpenSSH's sshd with the same key.
ssh-keygen -q -t ed25519 -N '' -f "$tmp/host_key"
mkdir -p /run/sshd "$tmp/home"
cp "$tmp/key.pub" "$tmp/authorized_keys"
cat > "$tmp/sshd_config" <<CFG
Port $sshd_port
ListenAddress 127.0.0.1
HostKey $tmp/host_key
AuthorizedKeysFile $tmp/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
StrictModes no
PermitRootLogin prohibit-password
CFG
/usr/sbin/sshd -D -e -f "$tmp/sshd_config" 2>"$tmp/sshd.log" &
sshd_pid=$!
for _ in $(seq 100); do ssh "${opts[@]}" -p "$sshd_port" root@127.0.0.1 true 2>/dev/null && break; sleep 0.1; done

time_runs() { # prints one duration in ms per run
  for _ in $(seq "$rounds"); do
    local t0=$(date +%s%N); "$@" >/dev/null; local t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000 ))
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1000}'
}
nook_ms=$(time_runs ssh "${opts[@]}" -p "$nook_port" lobby@127.0.0.1 ls)
sshd_ms=$(time_runs ssh "${opts[@]}" -p "$sshd_port" root@127.0.0.1 true)
echo "nook lobby 'ssh HOST ls':       median ${nook_ms} ms over $rounds"
echo "OpenSSH sshd 'ssh HOST true':    median ${sshd_ms} ms over $rounds"
awk -v a="$nook_ms" -v b="$sshd_ms" 'BEGIN { printf "ratio nook/openssh: %.2f\n", a/b }'
