#!/usr/bin/env bash
# Clone benchmark, one run, against the baseline of copying the whole disk image with `cp`:
#  1. stopped clone of a VM with a 1 GiB and a 20 GiB disk (each holding 256 MiB of written
#     data): nook's `cp` time should not depend on the size (ratio ~1);
#  2. `cp` of the same disk as one full raw image file (what a copying clone costs);
#  3. running clone (fork) of 256 MiB and 1 GiB guests with half their memory in use:
#     total time and how long the source was paused.
# Run as root after `cargo build --release -p nook` and `scripts/build-agent`:
#   bench/clone.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
nook=$PWD/target/release/nook
images=${NOOK_IMAGES_DIR:-/var/cache/nook-test/images}
agent=$PWD/target/x86_64-unknown-linux-gnu/release/nook-guest-agent
tmp=$(mktemp -d /var/tmp/nook-clone-bench.XXXX)
export NOOK_DATA_DIR=$tmp/data NOOK_IMAGES_DIR=$images NOOK_AGENT=$agent NOOK_SSH_ADDR=off
mkdir -p "$NOOK_DATA_DIR"
"$nook" serve >"$tmp/log" 2>&1 &
pid=$!
trap 'for v in $("$nook" vm list --json 2>/dev/null | python3 -c "import json,sys; [print(v[\"name\"]) for v in json.load(sys.stdin)]"); do "$nook" vm rm "$v" >/dev/null 2>&1; done; kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do [ -S "$NOOK_DATA_DIR/nook.sock" ] && break; sleep 0.1; done

# Median of the numbers on stdin.
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
field() { python3 -c "import json,sys; v=json.load(sys.stdin); print(v$1)"; }
ms_of() { python3 -c "import time,sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000, 1))" "$1" "$2"; }

stopped_clone() { # $1 = disk size
  local name times=()
  name=s$(echo "$1" | tr A-Z a-z)
  "$nook" vm create --image tiny --name "$name" --disk "$1" >/dev/null 2>&1
  "$nook" vm exec "$name" -- sh -c 'dd if=/dev/urandom of=/root/data bs=1M count=256 2>/dev/null && sync'
  "$nook" vm stop "$name" >/dev/null
  for i in $(seq "$rounds"); do
    times+=("$("$nook" vm cp "$name" "$name-c$i" --json | field '["timings"]["total_ms"]')")
    "$nook" vm rm "$name-c$i" >/dev/null 2>&1
  done
  printf '%s\n' "${times[@]}" | median
}

full_copy() { # $1 = disk size: cp of the disk as one full raw image, as a copying clone does
  local id raw t0 t1
  id=$("$nook" vm list --json | python3 -c "import json,sys; print([v['id'] for v in json.load(sys.stdin) if v['name']=='s$(echo "$1" | tr A-Z a-z)'][0])")
  raw=$tmp/full-$1.raw
  qemu-img convert -O raw -S 0 "$NOOK_DATA_DIR/vms/$id/disk.qcow2" "$raw"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(date +%s.%N); cp "$raw" "$raw.copy"; sync; t1=$(date +%s.%N)
  rm -f "$raw" "$raw.copy"
  ms_of "$t0" "$t1"
}

running_clone() { # $1 = memory size, $2 = MiB of it to fill
  local name totals=() pauses=() out
  name=r$(echo "$1" | tr A-Z a-z)
  "$nook" vm create --image tiny --name "$name" --memory "$1" >/dev/null 2>&1
  # Half the guest's memory in use (tmpfs), so the fork has real pages to carry.
  "$nook" vm exec "$name" -- sh -c "mount -o remount,size=90% /dev/shm; dd if=/dev/urandom of=/dev/shm/fill bs=1M count=$2 2>/dev/null"
  for i in $(seq "$rounds"); do
    out=$("$nook" vm cp "$name" "$name-c$i" --json)
    totals+=("$(echo "$out" | field '["timings"]["total_ms"]')")
    pauses+=("$(echo "$out" | field '["timings"]["source_paused_ms"]')")
    "$nook" vm rm "$name-c$i" >/dev/null 2>&1
  done
  echo "$(printf '%s\n' "${totals[@]}" | median) $(printf '%s\n' "${pauses[@]}" | median)"
}

echo "accel: $("$nook" vm create --image tiny --name probe --json >/dev/null 2>&1; curl -s --unix-socket "$NOOK_DATA_DIR/nook.sock" http://nook/v1/info | field '["accel"]')"
"$nook" vm rm probe >/dev/null
s1=$(stopped_clone 1G); s20=$(stopped_clone 20G)
c1=$(full_copy 1G); c20=$(full_copy 20G)
read -r r256 p256 < <(running_clone 256M 128)
read -r r1g p1g < <(running_clone 1G 512)
python3 - "$s1" "$s20" "$c1" "$c20" "$r256" "$p256" "$r1g" "$p1g" <<'PY'
import sys
s1, s20, c1, c20, r256, p256, r1g, p1g = map(float, sys.argv[1:])
print(f"stopped clone, 1 GiB disk:   {s1:8.1f} ms   (cp of the full image: {c1:8.1f} ms, {c1/s1:6.0f}x faster)")
print(f"stopped clone, 20 GiB disk:  {s20:8.1f} ms   (cp of the full image: {c20:8.1f} ms, {c20/s20:6.0f}x faster)")
print(f"20 GiB / 1 GiB clone time:   {s20/s1:8.2f}")
print(f"running clone, 256 MiB guest: {r256:8.1f} ms total, source paused {p256:5.1f} ms")
print(f"running clone, 1 GiB guest:   {r1g:8.1f} ms total, source paused {p1g:5.1f} ms")
PY
