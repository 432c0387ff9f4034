#!/usr/bin/env bash
# Clone benchmark, one run, against the baseline of copying the whole disk image with `cp`:
#  1. stopped clone of a VM with a 1 GiB and a 20 GiB disk (each holding 256 MiB of written
#     data): nook's `cp` time should not depend on the size (ratio ~1);
#  2. `cp` of the same disk as one full raw image file (what a copying clone costs);
#  3. running clone (fork) of 256 MiB and 1 GiB guests with half their memory in use:
#     `cp` until the clone answers (the command returns once it has taken its identity),
#     how long the source was paused, and the host memory the two QEMUs share right after
#     the fork and 60 s later (their RSS counted twice minus their PSS: what shared mappings
#     give back; QEMU's own shared libraries are a few MiB of it). Each round waits for the
#     source to have memory of its own again (seconds after the last fork), and the moves
#     into it are listed from the daemon's log. FORK_MEMORY=shared keeps the two sharing.
#  4. the same 1 GiB fork while a command streams through the source's guest agent (as an
#     `ssh VM@HOST` shell or `nook vm exec` does), next to (3): `cp` until the clone answers,
#     whether each fork was instant, and whether the stream came through every fork whole
#     (a counter printed every 50 ms, checked for gaps and repeats).
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
export NOOK_FORK_MEMORY=${FORK_MEMORY:-own}
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
  # Two full copies of the disk must fit beside everything else; say so rather than fail.
  local need_kib avail_kib
  need_kib=$(( $(qemu-img info --output=json "$NOOK_DATA_DIR/vms/$id/disk.qcow2" | field '["virtual-size"]') * 2 / 1024 ))
  avail_kib=$(df --output=avail -k "$tmp" | tail -1)
  if [ "$avail_kib" -lt "$need_kib" ]; then echo nan; return; fi
  qemu-img convert -O raw -S 0 "$NOOK_DATA_DIR/vms/$id/disk.qcow2" "$raw"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(date +%s.%N); cp "$raw" "$raw.copy"; sync; t1=$(date +%s.%N)
  rm -f "$raw" "$raw.copy"
  ms_of "$t0" "$t1"
}

qemu_pid() { # $1 = VM name
  local id
  id=$("$nook" vm list --json | python3 -c "import json,sys; print([v['id'] for v in json.load(sys.stdin) if v['name']=='$1'][0])")
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q "qemu-system.*nook-$id "; then basename "$p"; return; fi
  done 2>/dev/null
}
# Whether VM $1's QEMU maps a memfd of its own shared (an instant fork can share it), rather
# than an instant fork's copy-on-write (it moves into its own within seconds of the fork).
# With FORK_MEMORY=copy guest RAM is anonymous and every fork copies: nothing to wait for.
own_ram() {
  [ "$NOOK_FORK_MEMORY" = copy ] || grep -q 'rw-s .*memfd:nook-ram' "/proc/$(qemu_pid "$1")/maps" 2>/dev/null
}
shared_mib() { # $1 $2 = pids: RSS counted twice minus PSS, in MiB
  awk '/^Rss:/ {r += $2} /^Pss:/ {p += $2} END {printf "%.0f", (r - p) / 1024}' \
    "/proc/$1/smaps_rollup" "/proc/$2/smaps_rollup"
}

running_clone() { # $1 = memory size, $2 = MiB of it to fill
  local name totals=() pauses=() out sp cp
  name=r$(echo "$1" | tr A-Z a-z)
  log_from=$(wc -l < "$tmp/log")
  "$nook" vm create --image tiny --name "$name" --memory "$1" >/dev/null 2>&1
  # Half the guest's memory in use (tmpfs), so the fork has real pages to carry.
  "$nook" vm exec "$name" -- sh -c "mount -o remount,size=90% /dev/shm; dd if=/dev/urandom of=/dev/shm/fill bs=1M count=$2 2>/dev/null"
  for i in $(seq "$rounds"); do
    # After an instant fork the source moves into memory of its own in the background; a cp
    # meanwhile waits for that move. Each round starts once it is done, as a user's next cp
    # a few seconds later would.
    for _ in $(seq 150); do own_ram "$name" && break; sleep 0.2; done
    out=$("$nook" vm cp "$name" "$name-c$i" --json)
    totals+=("$(echo "$out" | field '["timings"]["total_ms"]')")
    pauses+=("$(echo "$out" | field '["timings"]["source_paused_ms"]')")
    # Where the time went, per round: the disk layers, the memory stream, the clone's identity.
    echo "  $1 round $i: $(echo "$out" | field '["timings"]')" >&2
    if [ "$i" -lt "$rounds" ]; then "$nook" vm rm "$name-c$i" >/dev/null 2>&1; fi
  done
  # The last clone is kept a minute: what the two share right away (before they move into
  # memory of their own, which starts at once), and a minute later.
  local shared0 shared60
  shared0=$(shared_mib "$(qemu_pid "$name")" "$(qemu_pid "$name-c$rounds")" 2>/dev/null || echo nan)
  sleep 60
  shared60=$(shared_mib "$(qemu_pid "$name")" "$(qemu_pid "$name-c$rounds")" 2>/dev/null || echo nan)
  "$nook" vm rm "$name-c$rounds" >/dev/null 2>&1
  # The moves into memory of their own (source and clones), from the daemon's log.
  tail -n +"$((log_from + 1))" "$tmp/log" | { grep -a 'memory of its own again' || true; } | sed 's/\x1b\[[0-9;]*m//g' |
    awk '{for (i = 1; i <= NF; i++) if ($i ~ /^(secs|paused_ms)=/) printf "%s ", $i; print ""}' |
    sed 's/^/  moved: /' >&2
  echo "$(printf '%s\n' "${totals[@]}" | median) $(printf '%s\n' "${pauses[@]}" | median) $shared0 $shared60"
}

busy_clone() { # $1 = memory size, $2 = MiB of it to fill
  local name totals=() kinds=() out streamer
  name=b$(echo "$1" | tr A-Z a-z)
  "$nook" vm create --image tiny --name "$name" --memory "$1" >/dev/null 2>&1
  "$nook" vm exec "$name" -- sh -c "mount -o remount,size=90% /dev/shm; dd if=/dev/urandom of=/dev/shm/fill bs=1M count=$2 2>/dev/null"
  "$nook" vm exec "$name" -- sh -c 'i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done' >"$tmp/stream" 2>&1 &
  streamer=$!
  for _ in $(seq 100); do [ -s "$tmp/stream" ] && break; sleep 0.1; done
  for i in $(seq "$rounds"); do
    for _ in $(seq 150); do own_ram "$name" && break; sleep 0.2; done
    out=$("$nook" vm cp "$name" "$name-c$i" --json)
    totals+=("$(echo "$out" | field '["timings"]["total_ms"]')")
    kinds+=("$(echo "$out" | field '["timings"]["fork"]')")
    echo "  $1 busy round $i: $(echo "$out" | field '["timings"]')" >&2
    "$nook" vm rm "$name-c$i" >/dev/null 2>&1
  done
  # The last fork's move into memory of its own happens under the stream too.
  for _ in $(seq 150); do own_ram "$name" && break; sleep 0.2; done
  sleep 1
  kill "$streamer" 2>/dev/null; wait "$streamer" 2>/dev/null || true
  "$nook" vm rm "$name" >/dev/null 2>&1
  local whole
  whole=$(python3 -c "
import sys
n = [int(l) for l in open(sys.argv[1]) if l.strip().isdigit()]
print(f'{len(n)}-lines-' + ('whole' if n == list(range(n[0], n[0] + len(n))) else 'BROKEN'))" "$tmp/stream")
  echo "$(printf '%s\n' "${totals[@]}" | median) $(printf '%s\n' "${kinds[@]}" | sort | uniq -c | awk '{printf "%s%s:%s", sep, $2, $1; sep=","}') $whole"
}

echo "accel: $("$nook" vm create --image tiny --name probe --json >/dev/null 2>&1; curl -s --unix-socket "$NOOK_DATA_DIR/nook.sock" http://nook/v1/info | field '["accel"]')"
"$nook" vm rm probe >/dev/null
s1=$(stopped_clone 1G); s20=$(stopped_clone 20G)
c1=$(full_copy 1G); c20=$(full_copy 20G)
read -r r256 p256 sh256 sl256 < <(running_clone 256M 128)
read -r r1g p1g sh1g sl1g < <(running_clone 1G 512)
read -r b1g bkinds bstream < <(busy_clone 1G 512)
python3 - "$s1" "$s20" "$c1" "$c20" "$r256" "$p256" "$r1g" "$p1g" "$sh256" "$sl256" "$sh1g" "$sl1g" "$b1g" "$bkinds" "$bstream" <<'PY'
import sys
s1, s20, c1, c20, r256, p256, r1g, p1g, sh256, sl256, sh1g, sl1g, b1g = map(float, sys.argv[1:14])
bkinds, bstream = sys.argv[14:16]
def full(c, s):
    return "not enough free disk for two full copies" if c != c else f"{c:8.1f} ms, {c/s:6.0f}x faster"
print(f"stopped clone, 1 GiB disk:   {s1:8.1f} ms   (cp of the full image: {full(c1, s1)})")
print(f"stopped clone, 20 GiB disk:  {s20:8.1f} ms   (cp of the full image: {full(c20, s20)})")
print(f"20 GiB / 1 GiB clone time:   {s20/s1:8.2f}")
print(f"running clone, 256 MiB guest (128 MiB in use): {r256:8.1f} ms to the clone answering, source paused {p256:5.1f} ms;"
      f" shared {sh256:.0f} MiB right after, {sl256:.0f} MiB 60 s later")
print(f"running clone, 1 GiB guest (512 MiB in use):   {r1g:8.1f} ms to the clone answering, source paused {p1g:5.1f} ms;"
      f" shared {sh1g:.0f} MiB right after, {sl1g:.0f} MiB 60 s later")
print(f"running clone, 1 GiB guest, a command streaming through its agent: {b1g:8.1f} ms to the clone answering"
      f" ({b1g/r1g:.2f}x the idle fork); forks {bkinds}; the stream: {bstream.replace('-', ' ')}")
PY
