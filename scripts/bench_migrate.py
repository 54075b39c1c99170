"""Inner half of scripts/bench-migrate: runs where KVM can boot Linux (normally inside L1).

Per workload and round: boots the guest in a source VMM, starts a target VMM with
--migrate-from, relays the two VMMs' migration links (as the daemons will), sends the source's
control socket a `migrate` request, and records the answer and both consoles' ticks with the
host's clock. Prints medians.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time

from bench_boot import CMDLINE

READY = b"NANOCLAW-BENCH-READY"
TICK = b"NANOCLAW-TICK"
MEM_MIB = 256
DISK_MIB = 256
DISK_RATE = 20
TIMEOUT = 600.0
TARGET_MS = 300.0


class Console:
    """Reads a VMM's console (its stdout) on a thread: the ready marker, and each tick's host
    time."""

    def __init__(self, proc):
        self.proc = proc
        self.ready = threading.Event()
        self.ticks = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        buf = b""
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if READY in line:
                    self.ready.set()
                elif b"NANOCLAW-DIRTY" in line and os.environ.get("NANOCLAW_BENCH_DEBUG"):
                    print("   ", line.decode(errors="replace").strip(), flush=True)
                elif line.startswith(TICK):
                    self.ticks.append(now)


def accept(listener, proc, timeout):
    listener.settimeout(0.05)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"VMM exited with {proc.returncode} before it connected")
        try:
            conn, _ = listener.accept()
            conn.settimeout(None)
            return conn
        except socket.timeout:
            continue
    raise RuntimeError("no connection from the VMM")


def pump(src, dst, counter):
    n = 0
    while True:
        data = src.recv(1 << 20)
        if not data:
            break
        dst.sendall(data)
        n += len(data)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    counter.append(n)


def vmm(args, vm_dir, extra):
    pin = ["--cpus", args.cpus] if args.cpus else []
    return subprocess.Popen([args.vmm, "--vm-dir", vm_dir, "--memory-mib", str(MEM_MIB),
                             "--vcpus", "1", "--console", "-"] + pin + extra,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def blank(path):
    """A sparse, all-zero disk file of DISK_MIB."""
    with open(path, "wb") as f:
        f.truncate(DISK_MIB << 20)


def on_target(a, b):
    """Whether every 1 MiB of disk file `a` that holds data is the same in `b`."""
    with open(a, "rb") as x, open(b, "rb") as y:
        while True:
            p, q = x.read(1 << 20), y.read(1 << 20)
            if not p:
                return True
            if p.count(0) != len(p) and p != q:
                return False


def one(args, dirty, disk=0):
    top = tempfile.mkdtemp(prefix="bench-migrate-")
    src_dir, dst_dir = os.path.join(top, "src"), os.path.join(top, "dst")
    os.mkdir(src_dir)
    os.mkdir(dst_dir)
    procs = []
    try:
        extra = f"nanoclaw.dirty={dirty}" if dirty else ""
        disks = {}
        if disk:
            extra += f" nanoclaw.disk={disk}"
            for side, d in (("src", src_dir), ("dst", dst_dir)):
                disks[side] = os.path.join(d, "disk.img")
                blank(disks[side])
        src = vmm(args, src_dir, ["--kernel", args.vmlinux, "--initrd", args.initrd,
                                  "--cmdline-extra", (CMDLINE + " " + extra).strip()]
                  + (["--disk", disks["src"] + ",id=scratch"] if disk else []))
        procs.append(src)
        src_console = Console(src)
        if not src_console.ready.wait(TIMEOUT):
            raise RuntimeError("the source guest did not come up")
        time.sleep(1.0)  # let the workload run at its pace
        inbound_path = os.path.join(dst_dir, "inbound.sock")
        inbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        inbound.bind(inbound_path)
        inbound.listen(1)
        dst = vmm(args, dst_dir, ["--migrate-from", inbound_path]
                  + (["--disk", disks["dst"] + ",id=scratch"] if disk else []))
        procs.append(dst)
        dst_console = Console(dst)
        target_link = accept(inbound, dst, 60)
        outbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        outbound.bind(os.path.join(src_dir, "migrate.sock"))
        outbound.listen(1)
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.connect(os.path.join(src_dir, "control.sock"))
        started = time.monotonic()
        control.sendall(json.dumps({"op": "migrate", "socket": "migrate.sock",
                                    "downtime_ms": int(TARGET_MS)}).encode() + b"\n")
        try:
            source_link = accept(outbound, src, 60)
        except RuntimeError as e:
            control.settimeout(1.0)
            try:
                said = control.recv(4096).decode(errors="replace").strip()
            except OSError:
                said = "nothing"
            raise RuntimeError(f"{e}; the source's control socket said: {said}") from None
        sent, back = [], []
        threads = [threading.Thread(target=pump, args=(source_link, target_link, sent)),
                   threading.Thread(target=pump, args=(target_link, source_link, back))]
        for t in threads:
            t.start()
        reader = control.makefile("rb")
        progress = []
        while True:
            line = reader.readline()
            if not line:
                raise RuntimeError("the control socket closed before the answer")
            value = json.loads(line)
            if "progress" in value:
                progress.append(value["progress"])
            else:
                answer = value
                break
        total_ms = (time.monotonic() - started) * 1e3
        for t in threads:
            t.join(60)
        if not answer.get("ok"):
            raise RuntimeError(f"migration failed: {answer}")
        # The target's first tick after the switch (wait for a few).
        deadline = time.monotonic() + 60
        while len(dst_console.ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        if not dst_console.ticks:
            raise RuntimeError("the migrated guest does not tick on the target")
        last_src = max(t for t in src_console.ticks if t <= dst_console.ticks[0])
        seen_ms = (dst_console.ticks[0] - last_src) * 1e3
        m = answer["migration"]
        rounds = m["rounds"]
        same = None
        if disk:
            # What the source wrote up to the switch must be on the target's disk. The target
            # writes on, the same bytes at the next offsets, so the check is of every part of
            # the source's disk that holds data (the few the target rewrote since are alike).
            for p in procs:
                p.kill()
                p.wait()
            same = on_target(disks["src"], disks["dst"])
        # Distinct pages written during each round, over the rounds' time.
        dirtied = sum(r["dirty"] for r in rounds) * 4096
        dirty_s = sum(r["ms"] for r in rounds) / 1e3
        return {
            "total_ms": total_ms,
            "downtime_ms": m["downtime_ms"],
            "seen_ms": seen_ms,
            "rounds": len(rounds),
            "pages": sum(r["pages"] for r in rounds) + m["final_pages"],
            "blocks": sum(r.get("blocks", 0) for r in rounds) + m.get("final_blocks", 0),
            "same_disk": same,
            "final_pages": m["final_pages"],
            "first_mbps": rounds[0]["mb_per_s"],
            "dirty_mbps": dirtied / 1e6 / max(dirty_s, 1e-3),
            "relayed_mb": sent[0] / 1e6 if sent else 0.0,
        }
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(top, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dirty", type=int, default=50)
    ap.add_argument("--vmm", required=True)
    ap.add_argument("--vmlinux", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--cpus", default="", help="pin both VMMs to these L1 CPUs")
    args = ap.parse_args()
    where = f"both VMMs on L1 CPUs {args.cpus}" if args.cpus else "VMMs not pinned"
    print(f"bench-migrate: {args.rounds} rounds per workload, {MEM_MIB} MiB, 1 vCPU, {where}, "
          f"downtime target {TARGET_MS:.0f} ms (Cloud Hypervisor's default)", flush=True)
    results = {}
    workloads = (("idle", 0, 0), (f"asked {args.dirty} MB/s", args.dirty, 0),
                 (f"disk {DISK_RATE} MB/s", 0, DISK_RATE))
    for label, dirty, disk in workloads:
        runs = []
        for i in range(args.rounds):
            try:
                r = one(args, dirty, disk)
            except RuntimeError as e:
                print(f"  {label} round {i + 1}: FAILED: {e}")
                continue
            print(f"  {label} round {i + 1}: total {r['total_ms']:.0f} ms, downtime "
                  f"{r['downtime_ms']:.0f} ms (seen {r['seen_ms']:.0f} ms), {r['rounds']} "
                  f"rounds, {r['pages']} pages ({r['final_pages']} stopped), round 0 at "
                  f"{r['first_mbps']:.0f} MB/s, guest dirtied {r['dirty_mbps']:.1f} MB/s, "
                  f"{r['relayed_mb']:.1f} MB relayed"
                  + (f", {r['blocks']} disk blocks, the source's data on the target's disk: "
                     f"{'all' if r['same_disk'] else 'NOT ALL'}" if disk else ""),
                  flush=True)
            runs.append(r)
        results[label] = runs
    print("medians:")
    for label, runs in results.items():
        if not runs:
            print(f"  {label:<16} no successful round")
            continue
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]
               if k != "same_disk"}
        def verdict(ms):
            return "met" if ms <= TARGET_MS else "NOT met"
        print(f"  {label:<16} total {med['total_ms']:7.0f} ms   downtime {med['downtime_ms']:6.0f} ms"
              f" ({verdict(med['downtime_ms'])})   seen from outside {med['seen_ms']:6.0f} ms "
              f"({verdict(med['seen_ms'])})   rounds {med['rounds']:.0f}   "
              f"the guest dirtied {med['dirty_mbps']:.1f} MB/s"
              + (f"   disk blocks {med['blocks']:.0f}" if med["blocks"] else ""))


if __name__ == "__main__":
    main()
