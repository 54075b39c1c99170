"""Inner half of scripts/bench-density: runs where KVM can boot Linux (normally inside L1), as root.

Starts idle guests one after another, each in its own jailed VMM (its own uid, as the daemon
runs them), keeps them all running, and stops adding at --max guests, at the first guest that
does not come up, or when MemAvailable falls under a floor (so the host itself is never pushed
into the OOM killer). With all of them idle, it measures each guest's cost and prints medians.
"""

import argparse
import os
import re
import select
import signal
import statistics
import subprocess
import tempfile
import time

from bench_boot import MEM_MIB, ours, split_rss_kib
from bench_jail import children, vm_rss

READY = b"NANOCLAW-BENCH-READY"
MEM_LINE = re.compile(rb"NANOCLAW-BENCH-MEM total=(\d+) free=(\d+)")
JAIL_UID = 1_999_100_000
FLOOR_KIB = 384 * 1024
BOOT_TIMEOUT = 600.0


def meminfo(field):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def start(args, vm_dir, index):
    """Starts guest `index` jailed; returns (Popen, (guest-used KiB, KiB its kernel reserved),
    seconds to ready)."""
    uid = str(JAIL_UID + index)
    cmd = ours(args, args.vmlinux, vm_dir) + ["--jail-uid", uid, "--jail-gid", uid]
    if args.cpus:
        cmd += ["--cpus", args.cpus]
    began = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    buf = b""
    while READY not in buf:
        left = BOOT_TIMEOUT - (time.monotonic() - began)
        if left <= 0 or proc.poll() is not None:
            break
        r, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if r:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
    m = MEM_LINE.search(buf)
    if READY not in buf or not m:
        proc.kill()
        proc.wait()
        return None, None, time.monotonic() - began
    total, free = int(m.group(1)), int(m.group(2))
    # RAM the guest's kernel kept out of MemTotal at boot: its own image, its page array and
    # the firmware areas; its image and page array are written, so the host backs them.
    reserved = MEM_MIB * 1024 - total
    return proc, (total - free, reserved), time.monotonic() - began


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--max", type=int, default=64)
    p.add_argument("--vmm", required=True)
    p.add_argument("--vmlinux", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--cpus", help="pin every VMM to these host CPUs (nanoclaw-vmm --cpus)")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-density: the jail needs root")

    total_kib = meminfo("MemTotal")
    print(f"bench-density: idle guests of {MEM_MIB} MiB, 1 vCPU, jailed, ELF vmlinux; host "
          f"MemTotal {total_kib // 1024} MiB; stop at {args.max} guests or MemAvailable < "
          f"{FLOOR_KIB // 1024} MiB; VMMs on CPUs {args.cpus or 'any'}", flush=True)
    guests = []  # (Popen, guest-used KiB)
    stop_reason = f"reached MAX ({args.max})"
    with tempfile.TemporaryDirectory() as d:
        time.sleep(2)
        before = meminfo("MemAvailable")
        try:
            for i in range(args.max):
                if meminfo("MemAvailable") < FLOOR_KIB:
                    stop_reason = "MemAvailable under the floor"
                    break
                proc, used, took = start(args, os.path.join(d, f"vm{i}"), i)
                if proc is None:
                    stop_reason = f"guest {i + 1} did not come up within {took:.0f} s"
                    break
                guests.append((proc, used))
                if (i + 1) % 8 == 0 or i == 0:
                    print(f"  {i + 1:3} running; last came up in {took:.1f} s; MemAvailable "
                          f"{meminfo('MemAvailable') // 1024} MiB", flush=True)
            time.sleep(5)  # let the last ones settle
            after = meminfo("MemAvailable")
            n = len(guests)
            if n == 0:
                raise SystemExit(f"bench-density: no guest came up ({stop_reason})")
            vmm_other, backed, supervisors = [], [], []
            for proc, _used in guests:
                kids = children(proc.pid)
                if len(kids) != 1:
                    raise SystemExit(f"bench-density: expected one jailed VMM, found {kids}")
                g, o = split_rss_kib(kids[0])
                backed.append(g)
                vmm_other.append(o)
                supervisors.append(vm_rss(proc.pid))
            used = [u for _p, (u, _r) in guests]
            reserved = [r for _p, (_u, r) in guests]
            per_guest = (before - after) / n
            med = statistics.median
            print(f"ran at once: {n} idle guests ({stop_reason})")
            print(f"per guest, medians (KiB):")
            print(f"  VMM RSS without guest memory   {med(vmm_other):8.0f}")
            print(f"  jail supervisor RSS            {med(supervisors):8.0f}")
            print(f"  guest memory the host backs    {med(backed):8.0f}")
            print(f"  sum of the three               {med(vmm_other) + med(supervisors) + med(backed):8.0f}")
            print(f"  MemAvailable fall per guest    {per_guest:8.0f}  (all of it, KVM's kernel "
                  f"memory included)")
            print(f"  used inside the guest          {med(used):8.0f}  (MemTotal - MemFree)")
            print(f"  reserved by the guest kernel   {med(reserved):8.0f}  (RAM - MemTotal: its "
                  f"image, page array, firmware areas)")
            idle = max(0, med(backed) - med(used) - med(reserved))
            print(f"  backed but free in the guest   {idle:8.0f}  ({100 * idle / med(backed):.0f}% "
                  f"of the backed memory, about: what free page reporting could return)")
            more = max(0, (after - FLOOR_KIB) // per_guest) if per_guest > 0 else 0
            print(f"MemAvailable left {after // 1024} MiB: room for about {more:.0f} more at "
                  f"{per_guest / 1024:.1f} MiB each (keeping {FLOOR_KIB // 1024} MiB free), "
                  f"so about {n + more:.0f} in this {total_kib // 1024} MiB host")
        finally:
            for proc, _used in guests:
                proc.send_signal(signal.SIGTERM)
            for proc, _used in guests:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
