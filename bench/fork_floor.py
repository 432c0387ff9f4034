#!/usr/bin/env python3
"""What raw QEMU can do when forking a running guest: the floor under nook's `cp` of a running VM.

Two ways, each from a guest holding FILL MiB of random data in a tmpfs, median of ROUNDS:

  copying  what nook's fork does today: a live precopy migration over a unix socket from the
           source (anonymous RAM) into a fresh QEMU waiting with `-incoming defer`; the source
           runs on. Every page in use is copied into memory the clone allocates.
  shared   the symmetric fork: the source's RAM is a memfd it maps `share=on`. At the fork the
           memfd is sealed against writes (F_SEAL_FUTURE_WRITE: the source's own mapping still
           writes; no one can write, punch or newly map it shared again), two QEMUs -- the
           source's successor and the clone -- start with `-incoming defer` and map it
           privately (`share=off`), the source is paused and its device state alone is saved
           (`x-ignore-shared`), and both load that state. Nothing is copied; pages are copied on
           write.

Every guest has a virtio-balloon with free page reporting, as nook's do. Without the seal that
breaks the shared fork: QEMU 7.2 gives memory a guest reports free back by punching a hole in the
RAM's file, even in a private mapping, so the clone freeing its copy of the data zeroed it under
the successor (measured: the successor's checksum changed; FORK_FLOOR_UNSEALED=1 shows it). With
the seal the punch fails and the base stays whole (so a fork's guest gives back nothing through
its balloon: QEMU 7.2 gives up on a refused punch); each round checks that, after the clone has
freed its copy of the data.

For each it reports how long the source's vCPUs were stopped, when the clone ran and when it
answered on its console, and the memory the two share right after (their RSS counted twice less
their PSS), once each has read all of the data back. It also reports what fresh memory costs this host: touching 1 GiB the first time
and again (a nested VM whose host reclaims freed memory pays heavily for the first touch).

The guest is the tiny image's kernel and initrd with a busybox shell (no disk, no nook).
Run as root:  bench/fork_floor.py [MEMORY_MIB] [FILL_MIB] [ROUNDS]     (defaults 1024 512 5)
"""

import fcntl
import json
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

IMAGES = os.environ.get("NOOK_IMAGES_DIR", "/var/cache/nook-test/images")
KERNEL = f"{IMAGES}/tiny/vmlinux"
INITRD = f"{IMAGES}/tiny/initrd.cpio"


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']['desc']}")

    def wait_migration(self):
        while True:
            info = self.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"migration {status}: {info.get('error-desc')}")
            time.sleep(0.001)


class Console:
    """The guest's serial console: a shell; each command ends by echoing a marker."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(0.05)
        self.count = 0

    def run(self, command, timeout=300):
        self.count += 1
        # The marker is computed by the shell so that the echoed command line never matches.
        marker = f"done-{self.count * 1000 + 1}"
        self.sock.sendall(f"{command}; echo done-$(({self.count} * 1000 + 1))\n".encode())
        buf, deadline = b"", time.time() + timeout
        while time.time() < deadline:
            try:
                buf += self.sock.recv(65536)
            except socket.timeout:
                pass
            if marker.encode() in buf:
                return buf.decode(errors="replace")
        raise RuntimeError(f"no answer to {command!r}: {buf[-300:]!r}")


class Bench:
    def __init__(self, memory_mib, fill_mib):
        self.memory = memory_mib
        self.fill = fill_mib
        self.dir = tempfile.mkdtemp(prefix="nook-fork-floor.", dir="/var/tmp")
        self.ram = None  # the shared fork's memfd, a fresh one per round
        self.procs = []

    def qemu(self, name, backend, incoming=False):
        args = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", f"{self.memory}M",
            "-kernel", KERNEL, "-initrd", INITRD,
            "-append", "console=ttyS0 rdinit=/bin/sh quiet",
            "-display", "none", "-nodefaults",
            "-serial", f"unix:{self.dir}/{name}.console,server=on,wait=off",
            "-qmp", f"unix:{self.dir}/{name}.qmp,server=on,wait=off",
        ]
        args += ["-device", "virtio-balloon-pci,free-page-reporting=on"]
        if backend is None:
            args += ["-machine", "q35"]
        else:
            # The memfd is inherited at the same number; QEMU opens it again by its /proc name.
            args += [
                "-machine", "q35,memory-backend=ram",
                "-object", f"memory-backend-file,id=ram,size={self.memory}M,"
                f"mem-path=/proc/self/fd/{self.ram},share={backend}",
            ]
        if incoming:
            args += ["-incoming", "defer"]
        for suffix in ("qmp", "console"):
            try:
                os.unlink(f"{self.dir}/{name}.{suffix}")
            except FileNotFoundError:
                pass
        fds = () if backend is None else (self.ram,)
        with open(f"{self.dir}/{name}.log", "w") as log:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, pass_fds=fds)
        self.procs.append(proc)
        for _ in range(500):
            if all(os.path.exists(f"{self.dir}/{name}.{s}") for s in ("qmp", "console")):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU {name} exited with {proc.returncode}")
            time.sleep(0.01)
        return proc, Qmp(f"{self.dir}/{name}.qmp"), Console(f"{self.dir}/{name}.console")

    def source(self, backend):
        proc, qmp, console = self.qemu("source", backend)
        for _ in range(100):  # the shell comes up a few seconds after the kernel starts
            try:
                console.run("true", timeout=1)
                break
            except RuntimeError:
                pass
        # The balloon's driver, as the tiny image's init loads it, so that the guest reports
        # the memory it frees.
        console.run(
            "for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci"
            " virtio_balloon; do busybox insmod /lib/modules/$m.ko; done"
        )
        console.run(
            "busybox mount -t devtmpfs none /dev; busybox mkdir -p /mnt;"
            " busybox mount -t tmpfs -o size=95% none /mnt;"
            f" busybox dd if=/dev/urandom of=/mnt/fill bs=1M count={self.fill} 2>/dev/null"
        )
        return proc, qmp, console

    def end(self, *procs):
        for proc in procs:
            proc.kill()
            proc.wait()

    def copying(self):
        src, sq, sc = self.source(None)
        clone, cq, cc = self.qemu("clone", None, incoming=True)
        sock = f"{self.dir}/stream"
        cq.cmd("migrate-incoming", {"uri": f"unix:{sock}"})
        sq.cmd("migrate-set-parameters", {"downtime-limit": 20, "max-bandwidth": 1 << 40})
        t0 = time.time()
        sq.cmd("migrate", {"uri": f"unix:{sock}"})
        info = sq.wait_migration()
        completed = time.time()
        sq.cmd("cont")
        paused = info.get("downtime", 0) + (time.time() - completed) * 1000
        cq.wait_migration()
        cq.cmd("cont")
        running = time.time()
        cc.run("true")
        answered = time.time()
        ok = checksum(sc) == checksum(cc)
        shared = shared_mib(src.pid, clone.pid)
        self.end(src, clone)
        return paused, (running - t0) * 1000, (answered - t0) * 1000, shared, ok

    def shared(self):
        self.ram = os.memfd_create("nook-fork-floor-ram", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.ram, self.memory << 20)
        src, sq, sc = self.source("on")
        before = checksum(sc)
        if not os.environ.get("FORK_FLOOR_UNSEALED"):
            fcntl.fcntl(self.ram, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        succ, aq, ac = self.qemu("successor", "off", incoming=True)
        clone, cq, cc = self.qemu("clone", "off", incoming=True)
        # Each QEMU holds the memfd now: its pages are freed with the last of them.
        os.close(self.ram)
        self.ram = None
        state = f"{self.dir}/state"
        for q in (sq, aq, cq):
            q.cmd("migrate-set-capabilities",
                  {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        t0 = time.time()
        sq.cmd("stop")
        sq.cmd("migrate", {"uri": f"exec:cat > {state}"})
        sq.wait_migration()
        for q in (aq, cq):
            q.cmd("migrate-incoming", {"uri": f"exec:cat {state}"})
        aq.wait_migration()
        aq.cmd("cont")
        resumed = time.time()
        cq.wait_migration()
        cq.cmd("cont")
        running = time.time()
        cc.run("true")
        answered = time.time()
        self.end(src)
        ok = checksum(ac) == before == checksum(cc)
        shared = shared_mib(succ.pid, clone.pid)
        # Each writes its own data over the same pages and reads back its own.
        ac.run("busybox dd if=/dev/urandom of=/mnt/fill bs=1M count=16 conv=notrunc 2>/dev/null")
        mine = checksum(ac)
        ok = ok and mine != checksum(cc) == before
        # The clone frees its copy of the data, and its guest reports that memory free (every
        # 2 s): QEMU then punches the RAM's file, which the seal refuses (QEMU logs each
        # refusal), so the successor's data must stay whole.
        held = rss_mib(clone.pid)
        cc.run("busybox rm /mnt/fill")
        deadline = time.time() + 20
        while time.time() < deadline and not refused_punches(f"{self.dir}/clone.log") and \
                rss_mib(clone.pid) > held - self.fill // 2:
            time.sleep(0.5)
        refused = refused_punches(f"{self.dir}/clone.log")
        intact = checksum(ac) == mine
        if not intact:
            print(f"  the successor's data changed when the clone freed its copy "
                  f"(its QEMU went from {held} to {rss_mib(clone.pid)} MiB)")
        self.end(succ, clone)
        return (
            (resumed - t0) * 1000, (running - t0) * 1000, (answered - t0) * 1000, shared,
            ok and intact, refused,
        )

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.ram is not None:
            os.close(self.ram)


def checksum(console):
    out = console.run("busybox md5sum /mnt/fill")
    return next(line.split()[0] for line in out.splitlines() if "/mnt/fill" in line and
                len(line.split()[0]) == 32)


F_ADD_SEALS = 1033  # fcntl.h; Python's fcntl module names neither
F_SEAL_FUTURE_WRITE = 0x10


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def refused_punches(log):
    """How many times QEMU could not give memory back by punching its RAM's file."""
    with open(log, errors="replace") as f:
        return sum("Failed to fallocate" in line for line in f)


def shared_mib(a, b):
    rss = pss = 0
    for pid in (a, b):
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return (rss - pss) / 1024


def touch_ms(size):
    """Writes one byte per 4 KiB page of a fresh `size`-byte mapping (huge pages allowed)."""
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    started = time.time()
    for offset in range(0, size, 4096):
        area[offset] = 1
    elapsed = (time.time() - started) * 1000
    area.close()
    return elapsed


def main():
    defaults = [1024, 512, 5]
    memory, fill, rounds = [int(a) for a in sys.argv[1:4]] + defaults[len(sys.argv[1:4]):]
    first, again = touch_ms(1 << 30), touch_ms(1 << 30)
    print(f"fresh memory on this host: 1 GiB touched in {first:.0f} ms the first time, "
          f"{again:.0f} ms again")
    bench = Bench(memory, fill)
    try:
        for name, run in (("copying", bench.copying), ("shared", bench.shared)):
            results = [run() for _ in range(rounds)]
            if not all(r[4] for r in results):
                raise SystemExit(f"{name}: a fork's data was not its own (see above)")
            med = [statistics.median(r[i] for r in results) for i in range(4)]
            print(f"{name:8} fork of a {memory} MiB guest holding {fill} MiB (median of {rounds}): "
                  f"source paused {med[0]:.0f} ms, clone running at {med[1]:.0f} ms, "
                  f"answering at {med[2]:.0f} ms; shared {med[3]:.0f} MiB once both read the data; "
                  f"each round's answer: {', '.join(f'{r[2]:.0f}' for r in results)} ms")
            if name == "shared":
                print(f"         the clone then freed its copy of the data: its QEMU's punches "
                      f"of the sealed memfd were refused ({min(r[5] for r in results)}-"
                      f"{max(r[5] for r in results)} times a round), and the successor's data "
                      f"stayed whole in every round")
    finally:
        bench.cleanup()


if __name__ == "__main__":
    main()
