#!/usr/bin/env bash
# Benchmark: what a front door costs when the VM runs on another host of the fleet. Two hosts,
# each `nook serve` in a network namespace of its own, share one PostgreSQL; one tiny VM runs
# on h2 (the default image unless IMAGE says tiny). It times, through h2 (the VM's own host) and through h1 (over the host channel):
#   - `ssh VM@HOST true` (median of ROUNDS, a new SSH connection each);
#   - an HTTPS GET of the VM's page through the edge (median of ROUNDS requests on one
#     keep-alive connection, curl's time_total).
# and prints each ratio, other host / own host.
# Run as root after `scripts/build release` and `nook image build IMAGE`:
#   bench/fleet_routing.sh [ROUNDS] [IMAGE]        (defaults: 50, default)
# NOOK_IMAGES_DIR picks the images (default /var/lib/nook/images); NOOK_BIN the nook binary.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-50}
image=${2:-default}
nook=${NOOK_BIN:-$PWD/target/release/nook}
agent=${NOOK_AGENT:-$(dirname "$nook")/nook-guest-agent}
images=${NOOK_IMAGES_DIR:-/var/lib/nook/images}
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
tmp=$(mktemp -d /tmp/nook-fleetbench.XXXX)
chmod 755 "$tmp"
pids=()

cleanup() {
  for i in 1 2; do
    NOOK_DATA_DIR=$tmp/h$i "$nook" vm rm bench >/dev/null 2>&1 || true
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  su postgres -s /bin/sh -c "$pgbin/pg_ctl -D $tmp/pg/data -m immediate stop" >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  for i in 1 2; do ip netns del "nook-bench-h$i" 2>/dev/null || true; done
  ip link del nbench0 2>/dev/null || true
  for d in /sys/fs/cgroup/*/nook-bench-h* /sys/fs/cgroup/nook-bench-h*; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

# The network: a bridge here (10.253.0.1) and a namespace per host (10.253.0.1N).
ip link add nbench0 type bridge
ip addr add 10.253.0.1/24 dev nbench0
ip link set nbench0 up
for i in 1 2; do
  ns=nook-bench-h$i
  ip netns add "$ns"
  ip link add "nbenchv$i" type veth peer name eth0 netns "$ns"
  ip link set "nbenchv$i" master nbench0 up
  ip -n "$ns" addr add "10.253.0.1$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done

# One PostgreSQL on a Unix socket, which both namespaces reach.
mkdir -p "$tmp/pg"
chown postgres "$tmp/pg"
su postgres -s /bin/sh -c "$pgbin/initdb -D $tmp/pg/data --auth=trust -U nook -E UTF8 --locale=C --no-sync" >/dev/null
su postgres -s /bin/sh -c "$pgbin/pg_ctl -D $tmp/pg/data -l $tmp/pg/log -o \"-k $tmp/pg -c listen_addresses= -c fsync=off\" start" >/dev/null
su postgres -s /bin/sh -c "$pgbin/createdb -h $tmp/pg -U nook nook"
store="postgres://nook@localhost/nook?host=$tmp/pg"

serve() { # host number
  local i=$1
  mkdir -p "$tmp/h$i"
  local store_env=(NOOK_STORE="$store")
  if [ "$i" != 1 ]; then
    # A further host joins through h1 (the store and the secrets key come with it).
    local token=
    for _ in $(seq 100); do
      token=$(NOOK_DATA_DIR=$tmp/h1 "$nook" host invite 2>/dev/null) && break
      sleep 0.1
    done
    NOOK_DATA_DIR=$tmp/h$i nsenter --net=/run/netns/nook-bench-h$i "$nook" host join "$token" \
      --host-name "h$i" --host-addr "10.253.0.1$i" >/dev/null
    store_env=()
  fi
  env "${store_env[@]}" NOOK_DATA_DIR=$tmp/h$i NOOK_IMAGES_DIR=$images NOOK_AGENT=$agent \
    NOOK_SSH_ADDR=10.253.0.1$i:2222 NOOK_HTTPS_ADDR=10.253.0.1$i:8443 NOOK_VM_PORTS=off \
    nsenter --net=/run/netns/nook-bench-h$i "$nook" serve --host-name "h$i" \
    --host-addr "10.253.0.1$i" --cgroup-top "nook-bench-h$i" >"$tmp/h$i.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do [ -S "$tmp/h$i/nook.sock" ] && [ -f "$tmp/h$i/secrets.key" ] && return; sleep 0.1; done
  echo "h$i did not start:"; cat "$tmp/h$i.log"; exit 1
}
serve 1
serve 2

ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key" -p 2222)
ssh "${opts[@]}" lobby@10.253.0.11 signup bench@example.com >/dev/null
ssh "${opts[@]}" lobby@10.253.0.11 new --name bench --image "$image" --on h2 >/dev/null
if [ "$image" = default ]; then
  # Measure the settled VM, as a user's later requests see it (see bench/ssh_vm.sh).
  ssh "${opts[@]}" bench@10.253.0.12 'sudo -n systemctl is-system-running --wait' >/dev/null || true
  serve_www='(setsid python3 -m http.server 80 -d /www >/dev/null 2>&1 &)'
else
  serve_www='httpd -p 80 -h /www'
fi
NOOK_DATA_DIR=$tmp/h2 "$nook" vm exec bench -- sh -c \
  "mkdir -p /www && echo hello > /www/index.html && $serve_www" >/dev/null
sleep 1
ssh "${opts[@]}" lobby@10.253.0.11 share set-public bench >/dev/null

median_ms() { sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'; }
ssh_ms() { # host address
  for _ in $(seq "$rounds"); do
    local t0=$(date +%s%N); ssh "${opts[@]}" "bench@$1" true; local t1=$(date +%s%N)
    echo "$(( (t1 - t0) / 1000 ))" | awk '{print $1/1000}'
  done | median_ms
}
https_ms() { # host number
  local ca host=bench.nook-vm.localhost urls=()
  ca=$(NOOK_DATA_DIR=$tmp/h$1 "$nook" ca path)
  for _ in $(seq "$rounds"); do urls+=(-o /dev/null "https://$host:8443/"); done
  curl -sS --cacert "$ca" --resolve "$host:8443:10.253.0.1$1" \
    -w '%{http_code} %{time_total}\n' -o /dev/null "https://$host:8443/" "${urls[@]}" >"$tmp/curl$1"
  if grep -qv '^200 ' "$tmp/curl$1"; then
    echo "HTTPS through h$1 failed:" >&2; sort "$tmp/curl$1" | uniq -c >&2; exit 1
  fi
  tail -n +2 "$tmp/curl$1" | awk '{print $2*1000}' | median_ms
}

# Warm both paths (the channel's pooled connection, the guest's page cache).
ssh "${opts[@]}" bench@10.253.0.11 true; ssh "${opts[@]}" bench@10.253.0.12 true
own_ssh=$(ssh_ms 10.253.0.12)
other_ssh=$(ssh_ms 10.253.0.11)
own_https=$(https_ms 2)
other_https=$(https_ms 1)
echo "($image image)"
echo "ssh VM@HOST true, VM's own host:      median ${own_ssh} ms over $rounds"
echo "ssh VM@HOST true, through another:    median ${other_ssh} ms over $rounds"
awk -v a="$other_ssh" -v b="$own_ssh" 'BEGIN { printf "ratio ssh other/own: %.2f\n", a/b }'
echo "HTTPS GET (keep-alive), own host:     median ${own_https} ms over $rounds"
echo "HTTPS GET (keep-alive), through another: median ${other_https} ms over $rounds"
awk -v a="$other_https" -v b="$own_https" 'BEGIN { printf "ratio https other/own: %.2f\n", a/b }'
