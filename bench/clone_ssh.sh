#!/usr/bin/env bash
# Benchmark: `cp` of a running default-image VM (1 GiB of RAM) as a user sees it, from the
# command to the clone answering `ssh CLONE@HOST true`, next to its own memory phase (the
# baseline: copying the guest's memory, which any running clone must do) in the same run.
# Reports medians over ROUNDS clones and the ratio. Run as root after `scripts/build release`
# and `nook image build default`:   bench/clone_ssh.sh [ROUNDS]
# NOOK_IMAGES_DIR picks the images (default /var/lib/nook/images).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
nook=${NOOK_BIN:-$PWD/target/release/nook}
tmp=$(mktemp -d /var/tmp/nook-clonessh.XXXX)
export NOOK_DATA_DIR=$tmp/data
cleanup() {
  for v in $("$nook" vm list --json 2>/dev/null | python3 -c "import json,sys; [print(v['name']) for v in json.loads(sys.stdin.read() or '[]')]" 2>/dev/null); do
    "$nook" vm rm "$v" >/dev/null 2>&1 || true
  done
  kill "${nook_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"
}
trap cleanup EXIT

# One daemon owns the host's VM network at a time: wait for system tests (or another bench) to
# finish with it.
mkdir -p /run/nook; exec 9>/run/nook/system-tests.lock; flock 9

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
ssh_=(ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key" -p "$port")
NOOK_SSH_ADDR=127.0.0.1:$port NOOK_HTTPS_ADDR=127.0.0.1:$(free_port) NOOK_VM_PORTS=off \
  "$nook" serve >"$tmp/nook.log" 2>&1 &
nook_pid=$!
for _ in $(seq 100); do "${ssh_[@]}" lobby@127.0.0.1 signup bench@example.com >/dev/null 2>&1 && break; sleep 0.1; done
kill -0 "$nook_pid" 2>/dev/null || { echo "nook serve did not start:" >&2; cat "$tmp/nook.log" >&2; exit 1; }
"${ssh_[@]}" lobby@127.0.0.1 new --name src --memory 1G >/dev/null ||
  { echo "new failed (is NOOK_AGENT a static guest agent?):" >&2; tail -20 "$tmp/nook.log" >&2; exit 1; }
# Clone a settled VM: a systemd guest is ready well before its boot ends, and a fork made in
# that window shares its one vCPU with the rest of that boot (see ARCHITECTURE.md).
"${ssh_[@]}" src@127.0.0.1 'sudo -n systemctl is-system-running --wait' >/dev/null || true
# Something running in the source, as in real use.
"${ssh_[@]}" src@127.0.0.1 'nohup sh -c "while :; do date > /tmp/tick; sleep 0.2; done" >/dev/null 2>&1 &'

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ends=() mems=() readies=() pauses=() totals=()
for i in $(seq "$rounds"); do
  t0=$(date +%s%N)
  out=$("${ssh_[@]}" lobby@127.0.0.1 cp src "c$i" --json) || { echo "cp failed: $out" >&2; tail -20 "$tmp/nook.log" >&2; exit 1; }
  "${ssh_[@]}" "c$i@127.0.0.1" true
  t1=$(date +%s%N)
  ends+=("$(( (t1 - t0) / 1000000 ))")
  mems+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["timings"]["memory_ms"])')")
  readies+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["timings"]["ready_ms"])')")
  pauses+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["timings"]["source_paused_ms"])')")
  totals+=("$(echo "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["timings"]["total_ms"]))')")
  "${ssh_[@]}" lobby@127.0.0.1 rm "c$i" >/dev/null
done
end=$(printf '%s\n' "${ends[@]}" | median)
mem=$(printf '%s\n' "${mems[@]}" | median)
echo "cp of a running default VM (1 GiB), command to 'ssh CLONE true': median ${end} ms over $rounds (${ends[*]})"
echo "  its memory phase alone (the baseline):                          median ${mem} ms (${mems[*]})"
echo "  identity and readiness after the memory:                        median $(printf '%s\n' "${readies[@]}" | median) ms"
echo "  the fork itself, as the daemon timed it:                         median $(printf '%s\n' "${totals[@]}" | median) ms (${totals[*]})"
echo "  source paused:                                                  median $(printf '%s\n' "${pauses[@]}" | median) ms"
awk -v a="$end" -v b="$mem" 'BEGIN { printf "ratio end-to-end/memory phase: %.2f\n", a/b }'
