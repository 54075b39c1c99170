"""Inner half of scripts/bench-jail: runs where KVM can boot Linux (normally inside L1), as root.

Boots the same kernel and initramfs N times jailed and N times unjailed, alternating, and
prints the medians of process start -> guest ready and their ratio. Then holds one guest of
each kind and prints the VMM's resident memory (whole, and excluding guest memory); for the
jailed VMM that is the VMM inside the jail, and the supervisor outside it is shown apart.
"""

import argparse
import os
import signal
import statistics
import tempfile

from bench_boot import boot_once, hold, ours, rss_excluding_guest_kib

JAIL_UID = 1_999_000_000


def jailed(args, kernel, vm_dir, extra=""):
    return ours(args, kernel, vm_dir, extra) + [
        "--jail-uid", str(JAIL_UID), "--jail-gid", str(JAIL_UID)]


def vm_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--vmm", required=True)
    p.add_argument("--vmlinux", required=True)
    p.add_argument("--initrd", required=True)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-jail: the jail needs root")

    print(f"bench-jail: {args.runs} runs each, alternating, ELF vmlinux", flush=True)
    times = {"unjailed": [], "jailed": []}
    with tempfile.TemporaryDirectory() as d:
        boot_once(ours(args, args.vmlinux, os.path.join(d, "w1")))
        boot_once(jailed(args, args.vmlinux, os.path.join(d, "w2")))
    for i in range(args.runs):
        for name, build in (("unjailed", ours), ("jailed", jailed)):
            with tempfile.TemporaryDirectory() as d:
                ready, _done, code = boot_once(build(args, args.vmlinux, os.path.join(d, "vm")))
            if code != 0:
                raise SystemExit(f"bench-jail: the {name} VMM exited with {code}")
            times[name].append(ready)
    for name, t in times.items():
        print(f"  {name:9} start->ready median {statistics.median(t)*1000:7.0f} ms "
              f"(min {min(t)*1000:.0f} max {max(t)*1000:.0f})")
    ratio = statistics.median(times["jailed"]) / statistics.median(times["unjailed"])
    print(f"boot-to-ready jailed/unjailed: {ratio:.3f} (target <= 1.1)")

    rss = {}
    for name, build in (("unjailed", ours), ("jailed", jailed)):
        with tempfile.TemporaryDirectory() as d:
            proc = hold(build(args, args.vmlinux, os.path.join(d, "vm"), "nanoclaw.bench=hold"))
            vmm = proc.pid
            supervisor = 0
            if name == "jailed":
                kids = children(proc.pid)
                if len(kids) != 1:
                    raise SystemExit(f"bench-jail: expected one jailed VMM, found {kids}")
                vmm, supervisor = kids[0], vm_rss(proc.pid)
            rss[name] = (vm_rss(vmm), rss_excluding_guest_kib(vmm), supervisor)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        total, excl, sup = rss[name]
        extra = f"; the supervisor outside the jail {sup} KiB" if name == "jailed" else ""
        print(f"  {name:9} VMM VmRSS {total} KiB, excluding guest memory {excl} KiB{extra}")
    print(f"VMM RSS jailed/unjailed: {rss['jailed'][0] / rss['unjailed'][0]:.3f} "
          f"(target within 10%: 0.9 to 1.1)")


if __name__ == "__main__":
    main()
