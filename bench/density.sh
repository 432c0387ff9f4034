#!/usr/bin/env bash
# Density benchmark: how many idle tiny-image VMs fit an account's envelope on this machine
# at each packing level (`--pack off|balanced|dense`), what each idle VM costs the host
# (its RAM plus its share of the compressed tier), how long an idle VM takes to answer the
# first HTTPS request through the edge (p50/p99: the first touch after its memory was
# packed, next to the same request once it is awake), and the CPU an idle VM costs.
# Firecracker's published VMM overhead (<= 5 MiB, guest memory excluded) is the baseline for
# "an extra VM costs nothing".
# Run as root after `scripts/build release`:
#   bench/density.sh [MAX_VMS] [LEVEL...]     (default: 100 off balanced dense)
# ENVELOPE sets the account's memory (default 8G); VM_MEMORY each VM's (default 128M);
# IMAGE the image (default tiny); IDLE_SECS how long the VMs idle before waking (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
max=${1:-100}
shift || true
if [ $# -gt 0 ]; then levels=("$@"); else levels=(off balanced dense); fi
envelope=${ENVELOPE:-8G}
vm_memory=${VM_MEMORY:-128M}
image=${IMAGE:-tiny}
idle_secs=${IDLE_SECS:-300}
nook=$PWD/target/release/nook
images=${NOOK_IMAGES_DIR:-/var/cache/nook-test/images}
agent=$PWD/target/x86_64-unknown-linux-gnu/release/nook-guest-agent

pct() { # $1 = percentile; numbers on stdin
  sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(p/100*(NR-1)+0.5)+1; if (i>NR) i=NR; printf "%.1f", a[i]}'
}

zswap=/sys/module/zswap/parameters
zswap_before=$(cd "$zswap" 2>/dev/null && grep -H . enabled compressor max_pool_percent shrinker_enabled 2>/dev/null || true)

run() { # $1 = pack level
  local pack=$1 tmp port https pid n=0
  tmp=$(mktemp -d /tmp/nook-density.XXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  https=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$tmp/data"
  cat > "$tmp/data/nook.toml" <<CFG
plan_cpu = 2.0
plan_memory = "$envelope"
plan_disk = "1T"
plan_max_vms = 500
host_max_vms = 500
memory_overcommit = 100.0
idle_after_secs = 20
CFG
  ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
  local opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key" -p "$port")
  local avail_before
  avail_before=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
  # Taps, so the edge reaches each VM's web server the way it does in production.
  NOOK_DATA_DIR=$tmp/data NOOK_IMAGES_DIR=$images NOOK_AGENT=$agent NOOK_SSH_ADDR=127.0.0.1:$port \
    NOOK_HTTPS_ADDR=127.0.0.1:$https NOOK_VM_PORTS=off NOOK_PACK=$pack "$nook" serve >"$tmp/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do ssh "${opts[@]}" lobby@127.0.0.1 signup density@example.com >/dev/null 2>&1 && break; sleep 0.1; done
  local cpu_before
  cpu_before=$(awk '/^cpu / {print $2+$3+$4+$6+$7+$8}' /proc/stat)
  while [ "$n" -lt "$max" ]; do
    if ! ssh "${opts[@]}" lobby@127.0.0.1 new --image "$image" --memory "$vm_memory" --name "d$n" >/dev/null 2>"$tmp/err"; then
      echo "  VM $((n+1)) did not fit: $(head -c 300 "$tmp/err")"
      break
    fi
    # A web server for the wake-up request, open to anyone so no login is timed.
    NOOK_DATA_DIR=$tmp/data "$nook" vm exec "d$n" -- sh -c \
      'mkdir -p /tmp/www && echo awake > /tmp/www/index.html && if command -v httpd >/dev/null; then httpd -p 80 -h /tmp/www; else setsid python3 -m http.server 80 -d /tmp/www </dev/null >/dev/null 2>&1 & fi' >/dev/null
    ssh "${opts[@]}" lobby@127.0.0.1 share set-public "d$n" >/dev/null
    n=$((n+1))
    if NOOK_DATA_DIR=$tmp/data "$nook" vm list --json | grep -q '"failed"'; then
      echo "  a VM was killed at $n VMs: the envelope's memory is full"; n=$((n-1)); break
    fi
  done
  # Idle for a while: the idle knobs, KSM, and with packing the squeeze, settle.
  local t0 cpu0
  sleep $(( idle_secs > 30 ? idle_secs - 30 : 0 ))
  # The whole host's CPU, and the VMs' QEMUs' own (their utime + stime), over 30 s.
  qemu_ticks() {
    local p sum=0
    for p in $(pgrep -f -- "-name nook-.*$tmp/data"); do
      sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$sum"
  }
  local qemu0 qemu1
  t0=$(date +%s.%N); cpu0=$(awk '/^cpu / {print $2+$3+$4+$6+$7+$8}' /proc/stat); qemu0=$(qemu_ticks)
  sleep 30
  local cpu1 t1 hz idle_cpu qemu_cpu
  cpu1=$(awk '/^cpu / {print $2+$3+$4+$6+$7+$8}' /proc/stat); t1=$(date +%s.%N); qemu1=$(qemu_ticks)
  hz=$(getconf CLK_TCK)
  idle_cpu=$(python3 -c "print(f'{($cpu1-$cpu0)/$hz/($t1-$t0)/max($n,1)*100:.2f}')")
  qemu_cpu=$(python3 -c "print(f'{($qemu1-$qemu0)/$hz/($t1-$t0)/max($n,1)*100:.2f}')")
  local mem zram avail_after
  local metrics disk
  metrics=$(NOOK_DATA_DIR=$tmp/data "$nook" metrics)
  metric() { awk -v m="$1" '$1 == m || index($1, m "{") == 1 {print $2}' <<< "$metrics"; }
  mem=$(metric nook_account_memory_bytes)
  zram=$(metric nook_tier_compressed_ram_bytes)
  zram=${zram:-0}
  disk=$(metric nook_tier_disk_swap_used_bytes)
  disk=${disk:-0}
  avail_after=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
  # What KSM saves: each page it shares beyond the first is memory not spent (QEMU is the only
  # process here that offers pages to KSM). RAM in a shared file would not get this.
  local ksm_per_vm
  ksm_per_vm=$(( $(cat /sys/kernel/mm/ksm/pages_sharing 2>/dev/null || echo 0) * $(getconf PAGESIZE) / 1048576 / (n > 0 ? n : 1) ))
  local per_vm=$(( (mem + zram) / 1048576 / (n > 0 ? n : 1) ))
  local host_per_vm=$(( (avail_before - avail_after) / 1024 / (n > 0 ? n : 1) ))
  # Waking: the first HTTPS request through the edge to VMs idle (and packed) all along,
  # then the same request again now that the VM is awake (a new TLS connection each time).
  local wakes=() awake=() v ca
  ca=$(NOOK_DATA_DIR=$tmp/data "$nook" ca path)
  get() { # $1 = VM; prints ms, or fails
    curl -sf -o /dev/null -m 30 --cacert "$ca" --resolve "$1.nook-vm.localhost:$https:127.0.0.1" \
      -w '%{time_total}' "https://$1.nook-vm.localhost:$https/" | awk '{printf "%.1f", $1 * 1000}'
  }
  for v in $(seq 0 $(( n > 20 ? 19 : n - 1 ))); do
    wakes+=("$(get "d$v" || echo 30000)")
    awake+=("$(get "d$v" || echo 30000)")
  done
  echo "pack=$pack: $n idle $image VMs ($vm_memory each) in a $envelope envelope;" \
    "RAM + compressed tier $(( (mem + zram) / 1048576 )) MiB = $per_vm MiB per VM" \
    "(host MemAvailable fell $host_per_vm MiB per VM), $(( disk / 1048576 / (n > 0 ? n : 1) )) MiB per VM on disk, KSM saving $ksm_per_vm MiB per VM; CPU per idle VM $idle_cpu% of one core ($qemu_cpu% in its QEMU);" \
    "first HTTPS request after ${idle_secs} s idle p50 $(printf '%s\n' "${wakes[@]}" | pct 50) ms" \
    "p99 $(printf '%s\n' "${wakes[@]}" | pct 99) ms, awake p50 $(printf '%s\n' "${awake[@]}" | pct 50) ms" \
    "p99 $(printf '%s\n' "${awake[@]}" | pct 99) ms"
  # Every VM the daemon has, the one whose boot was refused or killed included: QEMU outlives
  # the daemon, and a VM left behind would spin on in the next level's CPU measurement.
  for v in $(NOOK_DATA_DIR=$tmp/data "$nook" vm list --json | python3 -c "import json,sys; [print(v['name']) for v in json.load(sys.stdin)]"); do
    NOOK_DATA_DIR=$tmp/data "$nook" vm rm "$v" >/dev/null 2>&1 || true
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if pkill -KILL -f -- "-name nook-.*$tmp/data" 2>/dev/null; then
    echo "  (killed QEMUs this level left behind)"
  fi
  # What packing set up is taken down again, so the next level starts from a bare host.
  if [ -f "$tmp/data/zram-device" ]; then
    dev=$(cat "$tmp/data/zram-device")
    swapoff "/dev/zram$dev" 2>/dev/null || true
    echo "$dev" > /sys/class/zram-control/hot_remove 2>/dev/null || true
  fi
  # zswap as it was (its pool keeps what it holds until the swapoff below takes it back).
  local line
  while IFS=: read -r line value; do
    [ -n "$line" ] && echo "$value" > "$zswap/$line" 2>/dev/null || true
  done <<< "$zswap_before"
  [ -f "$tmp/data/swapfile" ] && swapoff "$tmp/data/swapfile" 2>/dev/null || true
  rm -rf "$tmp"
}

for level in "${levels[@]}"; do run "$level"; done
echo "Firecracker's published VMM overhead: <= 5 MiB per microVM (excluding guest memory)."
