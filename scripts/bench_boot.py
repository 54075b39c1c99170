"""Inner half of scripts/bench-boot: runs where KVM can boot Linux (normally inside L1).

For each kernel format, boots N rounds, each round one boot per VMM in turn (interleaved, so a
slow patch of the machine hits them alike), and records, from process start, the time until the
guest prints its ready marker on the console and the time until the process exits. The VMMs:
ours, QEMU microvm, and Firecracker when given (`--firecracker PATH`; the ELF vmlinux only, the
one format it boots), twice: bare (no device at all) and with one vsock device, as ours always
has one (the sidecar's only way to the host), so that the second is like for like. Then samples
each VMM's RSS excluding the guest-memory mapping while a guest holds. Prints medians and the
ratios.
"""

import argparse
import os
import re
import select
import shutil
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


def firecracker(args, kernel, vm_dir, extra="", vsock=False):
    """Firecracker without its API socket, from a config file in `vm_dir`. It stops on the
    guest's keyboard-controller reset, so its guest reboots with reboot=k. It logs at Info level
    so that its line once the vCPUs are started (FC_STARTED) splits its time as our timeline
    splits ours. With `vsock`, it gets one virtio-vsock device, as ours always has."""
    import json
    cmdline = CMDLINE.replace("reboot=t", "reboot=k")
    config = {
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": args.initrd,
            "boot_args": ("console=ttyS0 " + cmdline + " " + extra).strip(),
        },
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
    }
    if vsock:
        config["vsock"] = {"guest_cid": 3, "uds_path": os.path.join(vm_dir, "v.sock")}
    path = os.path.join(vm_dir, "firecracker.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return [args.firecracker, "--no-api", "--config-file", path, "--level", "Info"]


def firecracker_vsock(args, kernel, vm_dir, extra=""):
    return firecracker(args, kernel, vm_dir, extra, vsock=True)


# Firecracker's log line once it has built the VM and started its vCPUs (on its stdout).
FC_STARTED = b"Successfully started microvm"


TIMELINE = re.compile(rb"nanoclaw-vmm: boot_timeline_ms ((?:\w+=[0-9.]+ ?)+)")


def timeline_of(stderr):
    """Our VMM's boot timeline (stage -> ms since its start) from its stderr, or None."""
    m = TIMELINE.search(stderr or b"")
    if not m:
        return None
    return {k.decode(): float(v) for k, v in (kv.split(b"=") for kv in m.group(1).split())}


def boot_once(cmd, timeline=None, started=None):
    """Returns (seconds to marker, seconds to exit, exit code). With `timeline` (a list), our
    VMM's boot timeline is appended to it, with `ready` (the marker) in the same units. With
    `started` (a list), the seconds until FC_STARTED was read on stdout are appended to it."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if timeline is not None
                            else subprocess.DEVNULL)
    seen = b""
    ready = None
    started_at = None
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
            if started is not None and started_at is None and FC_STARTED in seen:
                started_at = time.monotonic() - start
            if MARKER in seen:
                ready = time.monotonic() - start
    code = proc.wait()
    done = time.monotonic() - start
    if ready is None:
        raise RuntimeError(f"{cmd[0]} exited ({code}) without the ready marker")
    if timeline is not None:
        t = timeline_of(proc.stderr.read())
        if t is not None:
            t["ready"] = ready * 1000
            timeline.append(t)
    if started is not None and started_at is not None:
        started.append(started_at)
    return ready, done, code


def split_rss_kib(pid):
    """(RSS of the guest-memory mapping(s), RSS of every other mapping) of `pid`, in KiB."""
    guest = other = 0
    size_kib = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                size_kib = None
            elif line.startswith("Size:"):
                size_kib = int(line.split()[1])
            elif line.startswith("Rss:"):
                if size_kib is not None and size_kib >= MEM_MIB * 1024:
                    guest += int(line.split()[1])
                else:
                    other += int(line.split()[1])
    return guest, other


def rss_excluding_guest_kib(pid):
    """Sum of Rss over all mappings of `pid` except the guest-memory mapping(s)."""
    return split_rss_kib(pid)[1]


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


def sample_rss(args, kernel, build):
    with tempfile.TemporaryDirectory() as d:
        proc = hold(build(args, kernel, d, "nanoclaw.bench=hold"))
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
    p.add_argument("--firecracker", help="a Firecracker binary, built outside this repository")
    args = p.parse_args()
    # Each VMM binary runs from local storage, as QEMU's does: ours and Firecracker's are given
    # as paths in the repository's folder, which L1 reads from the host over its shared folder,
    # page by page at each start. Copied once to L1's own /tmp, they load from its page cache.
    local = tempfile.mkdtemp(prefix="bench-boot-bin-")
    for attr in ("vmm", "firecracker"):
        path = getattr(args, attr)
        if path:
            copy = os.path.join(local, f"{attr}-{os.path.basename(path)}")
            shutil.copy2(path, copy)
            setattr(args, attr, copy)

    print(f"bench-boot: {args.runs} interleaved rounds, {MEM_MIB} MiB, 1 vCPU, cmdline '{CMDLINE}'"
          f"{'' if args.firecracker else ' (no --firecracker given: ours and QEMU only)'}", flush=True)
    results = {}
    for kname, kernel in (("bzImage", args.bzimage), ("vmlinux", args.vmlinux)):
        vmms = [("ours", ours), ("qemu-microvm", qemu)]
        if args.firecracker and kname == "vmlinux":
            vmms += [("firecracker", firecracker), ("firecracker+vsock", firecracker_vsock)]
        readies = {v: [] for v, _ in vmms}
        exits = {v: [] for v, _ in vmms}
        timelines = []
        fc_started = {}
        for vname, build in vmms:  # one warm-up boot each (page cache, first KVM VM)
            with tempfile.TemporaryDirectory() as d:
                boot_once(build(args, kernel, d))
        for _ in range(args.runs):
            for vname, build in vmms:
                with tempfile.TemporaryDirectory() as d:
                    ready, done, _code = boot_once(
                        build(args, kernel, d), timelines if vname == "ours" else None,
                        fc_started.setdefault(vname, []) if vname.startswith("firecracker")
                        else None)
                readies[vname].append(ready)
                exits[vname].append(done)
        for vname, _ in vmms:
            r, e = readies[vname], exits[vname]
            results[(kname, vname)] = (statistics.median(r), statistics.median(e))
            print(f"  {kname:8} {vname:17} start->ready median {results[(kname, vname)][0]*1000:7.0f} ms"
                  f"   start->exit median {results[(kname, vname)][1]*1000:7.0f} ms"
                  f"   (ready min {min(r)*1000:.0f} max {max(r)*1000:.0f})", flush=True)
        if timelines:
            stages = [k for k in timelines[0] if all(k in t for t in timelines)]
            print(f"  {kname:8} ours, timeline (median ms since the VMM started): " + "  ".join(
                f"{k} {statistics.median(t[k] for t in timelines):.1f}" for k in stages))
            guest = statistics.median(t["ready"] - t["first_run"] for t in timelines)
            host = statistics.median(t["first_run"] for t in timelines)
            print(f"  {kname:8} ours, before the first instruction {host:.1f} ms, the guest's own "
                  f"{guest:.1f} ms", flush=True)
        for vname, started in fc_started.items():
            if not started:
                continue
            # Read off Firecracker's stdout as it comes: its vCPUs run a little before.
            host = statistics.median(started) * 1000
            guest = statistics.median(readies[vname]) * 1000 - host
            print(f"  {kname:8} {vname}, to its 'started' log line {host:.1f} ms (its vCPUs "
                  f"run from just before), then to ready {guest:.1f} ms", flush=True)
    print("ratios ours/QEMU microvm (target <= 0.8):")
    for kname in ("bzImage", "vmlinux"):
        o, q = results[(kname, "ours")], results[(kname, "qemu-microvm")]
        print(f"  {kname:8} start->ready {o[0]/q[0]:.2f}   start->exit {o[1]/q[1]:.2f}")
    if args.firecracker:
        o = results[("vmlinux", "ours")]
        print("ratios ours/Firecracker (target <= 1.0, then 0.8):")
        for vname, what in (("firecracker+vsock", "with one vsock device each (like for like)"),
                            ("firecracker", "Firecracker bare, ours with its vsock device")):
            f = results[("vmlinux", vname)]
            print(f"  vmlinux  start->ready {o[0]/f[0]:.2f}   start->exit {o[1]/f[1]:.2f}   {what}")
    rss, total = sample_rss(args, args.vmlinux, ours)
    print(f"our VMM RSS excluding guest memory: {rss} KiB ({rss/1024:.2f} MiB; target <= 3 MiB); "
          f"total VmRSS {total} KiB")
    if args.firecracker:
        for vname, build in (("Firecracker", firecracker), ("Firecracker+vsock", firecracker_vsock)):
            frss, ftotal = sample_rss(args, args.vmlinux, build)
            print(f"{vname} RSS excluding guest memory: {frss} KiB ({frss/1024:.2f} MiB); "
                  f"total VmRSS {ftotal} KiB; ours/{vname} {rss/frss:.2f}")


if __name__ == "__main__":
    main()
