"""Inner half of scripts/bench-boot: runs where KVM can boot Linux (normally inside L1).

For each VMM and kernel format, boots N times and records, from process start, the time until
the guest prints its ready marker on the console and the time until the process exits. Then
samples our VMM's RSS excluding the guest-memory mapping while a guest holds. Prints medians.
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

MARKER = b"NANOCLAW-BENCH-READY"
# random.trust_cpu=on as our VMM's own command line has it, so that all three boot alike.
CMDLINE = "quiet reboot=t panic=-1 random.trust_cpu=on"
MEM_MIB = 128
TIMEOUT = 120.0


def ours(args, kernel, vm_dir, extra=""):
    return [args.vmm, "--kernel", kernel, "--initrd", args.initrd,
            "--vm-dir", vm_dir, "--memory-mib", str(MEM_MIB), "--vcpus", "1",
            "--console", "-", "--cmdline-extra", (CMDLINE + " " + extra).strip()]


def qemu(args, kernel, _vm_dir, extra=""):
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            "-accel", "kvm", "-cpu", "host", "-m", str(MEM_MIB), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", kernel, "-initrd", args.initrd,
            "-append", ("console=ttyS0 " + CMDLINE + " " + extra).strip()]


def boot_once(cmd):
    """Returns (seconds to marker, seconds to exit, exit code)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    seen = b""
    ready = None
    fd = proc.stdout.fileno()
    while True:
        left = TIMEOUT - (time.monotonic() - start)
        if left <= 0:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"timeout: {' '.join(cmd[:2])}")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if ready is None:
            seen = (seen + chunk)[-4096:]
            if MARKER in seen:
                ready = time.monotonic() - start
    code = proc.wait()
    done = time.monotonic() - start
    if ready is None:
        raise RuntimeError(f"{cmd[0]} exited ({code}) without the ready marker")
    return ready, done, code


def rss_excluding_guest_kib(pid):
    """Sum of Rss over all mappings of `pid` except the guest-memory mapping(s)."""
    total = 0
    size_kib = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                size_kib = None
            elif line.startswith("Size:"):
                size_kib = int(line.split()[1])
            elif line.startswith("Rss:"):
                if size_kib is not None and size_kib >= MEM_MIB * 1024:
                    continue  # guest memory
                total += int(line.split()[1])
    return total


def hold(cmd):
    """Starts `cmd` (a guest told to hold), waits for its ready marker; returns the Popen."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    buf = b""
    start = time.monotonic()
    while MARKER not in buf and time.monotonic() - start < TIMEOUT:
        r, _, _ = select.select([proc.stdout], [], [], 1.0)
        if r:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf = (buf + chunk)[-4096:]
    if MARKER not in buf:
        proc.kill()
        raise RuntimeError("the held guest never became ready")
    time.sleep(0.5)
    return proc


def sample_rss(args, kernel):
    with tempfile.TemporaryDirectory() as d:
        proc = hold(ours(args, kernel, d, "nanoclaw.bench=hold"))
        rss = rss_excluding_guest_kib(proc.pid)
        with open(f"/proc/{proc.pid}/status") as f:
            total = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        return rss, total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--vmm", required=True)
    p.add_argument("--bzimage", required=True)
    p.add_argument("--vmlinux", required=True)
    p.add_argument("--initrd", required=True)
    args = p.parse_args()

    print(f"bench-boot: {args.runs} runs each, {MEM_MIB} MiB, 1 vCPU, cmdline '{CMDLINE}'", flush=True)
    results = {}
    for kname, kernel in (("bzImage", args.bzimage), ("vmlinux", args.vmlinux)):
        for vname, build in (("ours", ours), ("qemu-microvm", qemu)):
            readies, exits = [], []
            # Interleave nothing: runs of one kind back to back, after one warm-up boot.
            with tempfile.TemporaryDirectory() as d:
                boot_once(build(args, kernel, d))
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as d:
                    ready, done, _code = boot_once(build(args, kernel, d))
                readies.append(ready)
                exits.append(done)
            results[(kname, vname)] = (statistics.median(readies), statistics.median(exits))
            print(f"  {kname:8} {vname:13} start->ready median {results[(kname, vname)][0]*1000:7.0f} ms"
                  f"   start->exit median {results[(kname, vname)][1]*1000:7.0f} ms"
                  f"   (ready min {min(readies)*1000:.0f} max {max(readies)*1000:.0f})", flush=True)
    print("ratios ours/QEMU microvm (target <= 0.8):")
    for kname in ("bzImage", "vmlinux"):
        o, q = results[(kname, "ours")], results[(kname, "qemu-microvm")]
        print(f"  {kname:8} start->ready {o[0]/q[0]:.2f}   start->exit {o[1]/q[1]:.2f}")
    rss, total = sample_rss(args, args.vmlinux)
    print(f"our VMM RSS excluding guest memory: {rss} KiB ({rss/1024:.2f} MiB; target <= 5 MiB); "
          f"total VmRSS {total} KiB")


if __name__ == "__main__":
    main()
