#!/usr/bin/env bash
# Boot benchmark for the default image (Debian + systemd): ROUNDS times `nook vm create` to
# ready through a private daemon, next to ROUNDS raw `qemu-system-x86_64` boots of the same
# image, kernel, initrd and devices to the same marker; medians, their ratio, and for one run
# the guest's `systemd-analyze` (total, the critical chains of the agent and sshd, blame).
#
# Ready = the guest agent answers over virtio-serial AND the guest's sshd listens on port 22,
# after the host handed the guest its SSH host keys (nook does that in `Identify`; the raw
# boot sends the same message). See crates/daemon/examples/boot_bench.rs for how each side
# is timed. The daemon uses user networking (no taps or nftables touched) and no listeners of
# its own, so it can run next to another nook; with user networking nook cannot reach the
# guest's port 22 from the host, so the bench waits for it inside the guest (one
# `nook vm exec` round trip late: an upper bound). NOOK_NET=tap makes the daemon wait for
# port 22 itself, as in production.
#
# Run as root after `scripts/build` and `nook image build default`:
#   bench/boot.sh [ROUNDS]            (default 5)
# Env: NOOK_IMAGES_DIR (default /var/cache/nook-test/images), NOOK_BIN, NOOK_AGENT,
#      NOOK_ACCEL (auto), NOOK_NET (user), PROFILE (release; `debug` after `scripts/build debug`).
#
# What it showed on a 2-core host without KVM (TCG, 1 vCPU guests), the host busy with other
# builds (load 2-5), for the recipe changes in crates/storage/src/recipe/default.rs:
#   before (recipe 2): create to ready 44-72 s; systemd started the agent 17-40 s into
#     userspace (after sysinit and basic.target) and generated SSH host keys in the guest
#     (21-35 s, RSA mostly), e2scrub_reap ran 24-38 s, fstab made systemd wait 25 s for
#     /dev/vda, and a boot-long storm of units shared the one vCPU with the agent.
#   after (recipe 3): create to ready median 14.1, 14.5 and 15.1 s over 5 (12.1-16.7 s) in
#     three runs of this script; raw QEMU to the same marker medians 16.3 and 14.7 s (ratio
#     0.89 and 1.03): nook adds nothing measurable to the guest's own boot.
#     The agent starts 3-4 s after systemd does (8-11 s after QEMU); what is left is the
#     kernel and initramfs (5-7 s), systemd's start (3-4 s) and the agent's set-up and
#     identity, sshd's start and nook's SSH key (4-5 s), all sharing one vCPU with the boot.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
profile=${PROFILE:-release}
target=${CARGO_TARGET_DIR:-$PWD/target}
flag=$([ "$profile" = release ] && echo --release || true)
cargo build -q $flag -p nook-daemon --example boot_bench

export NOOK_BIN=${NOOK_BIN:-$target/$profile/nook}
export NOOK_AGENT=${NOOK_AGENT:-$PWD/target/x86_64-unknown-linux-gnu/release/nook-guest-agent}
export NOOK_IMAGES_DIR=${NOOK_IMAGES_DIR:-/var/cache/nook-test/images}
export NOOK_NET=${NOOK_NET:-user}
# A private daemon: no SSH front door, HTTPS edge or VM ports to clash with another nook.
export NOOK_SSH_ADDR=off NOOK_HTTPS_ADDR=off NOOK_VM_PORTS=off
echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); nook: $NOOK_BIN; images: $NOOK_IMAGES_DIR"
"$target/$profile/examples/boot_bench" --image default "$rounds"
