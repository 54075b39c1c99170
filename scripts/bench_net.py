"""Inner half of scripts/bench-net: runs where KVM can boot Linux (normally inside L1).

Measures guest<->host TCP throughput through a virtio-net device on a TAP, for our VMM and for
QEMU microvm's virtio-net (`virtio-net-device`, userspace backend, `vhost=off`) on a TAP of its
own, booting the same kernel and initramfs with the same guest tools. Rounds are interleaved
(ours, QEMU, QEMU without offloads, ours, ...) so that a slow patch of the machine hits them
alike; each VMM's figures are the medians over the rounds.

QEMU is run twice per round:
- as it ships (`qemu`): it negotiates checksum and segmentation offloads and mergeable receive
  buffers with the guest, so the guest hands it 64 KiB TCP segments;
- with those features off (`qemu-nooffload`): the same feature set as ours (MAC only, 1500-byte
  frames), which separates what the device costs from what the missing offloads cost.

One boot per VMM per round. The guest (a busybox init, see scripts/bench-net) configures eth0
from its command line, listens on TCP port 5002, and prints a ready marker. The host then:
1. host->guest: connects to the guest's port 5002, sends `--mib` MiB and shuts its side. The
   guest's `nc` exits at the end of the stream and the guest then connects back to the host's
   port 5001: the time from the host's connect to that accept is the transfer time;
2. guest->host: the guest pipes `--mib` MiB from /dev/zero into `nc` to the host's port 5001;
   the time from the accept to the end of the stream is the transfer time.
Then the guest resets, and the VMM exits.
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time

MARKER = b"NANOCLAW-NET-READY"
CMDLINE = "quiet reboot=t panic=-1 random.trust_cpu=on"
MEM_MIB = 256
TIMEOUT = 300.0
H2G_PORT = 5002
G2H_PORT = 5001
CHUNK = 256 * 1024
STALL = 30.0


# With NANOCLAW_PIN_VMM_CPUS=1 (scripts/bench-net's default) both VMMs are kept on CPU 0; the
# host side runs where it likes.
PIN = os.environ.get("NANOCLAW_PIN_VMM_CPUS", "") not in ("", "0", "false", "no", "off")


def ours(args, kernel, vm_dir, tap, mac, extra):
    return [args.vmm, "--kernel", kernel, "--initrd", args.initrd,
            "--vm-dir", vm_dir, "--memory-mib", str(MEM_MIB), "--vcpus", "1",
            "--console", "-", "--net", f"tap={tap},mac={mac}",
            "--cmdline-extra", (CMDLINE + " " + extra).strip()] + (["--cpus", "0"] if PIN else [])


def qemu_with(offloads):
    off = "" if offloads else (
        ",csum=off,guest_csum=off,gso=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,"
        "guest_ufo=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off,mrg_rxbuf=off")

    def build(args, kernel, _vm_dir, tap, mac, extra):
        pin = ["taskset", "-c", "0"] if PIN else []
        return pin + [
                "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
                "-accel", "kvm", "-cpu", "host", "-m", str(MEM_MIB), "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", "stdio", "-kernel", kernel, "-initrd", args.initrd,
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-device,netdev=n0,mac={mac}{off}",
                "-append", ("console=ttyS0 " + CMDLINE + " " + extra).strip()]
    return build


def sh(*cmd):
    subprocess.run(cmd, check=True)


def make_tap(name, host_ip):
    subprocess.run(["ip", "link", "del", name], stderr=subprocess.DEVNULL)
    sh("ip", "tuntap", "add", "dev", name, "mode", "tap")
    sh("ip", "addr", "add", f"{host_ip}/24", "dev", name)
    sh("ip", "link", "set", name, "up")


class Guest:
    """A VMM process whose console a thread reads all along (a console nobody reads would fill
    its pipe and stop the guest at its next write)."""

    def __init__(self, cmd, vm_dir):
        self.vm_dir = vm_dir
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.console = b""
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read_all, daemon=True)
        self.reader.start()

    def _read_all(self):
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            with self.lock:
                self.console = (self.console + chunk)[-262144:]

    def text(self):
        with self.lock:
            return self.console.decode(errors="replace")

    def wait_ready(self, deadline):
        while MARKER.decode() not in self.text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.fail("no ready marker")
            time.sleep(0.02)

    def wait_exit(self, deadline):
        try:
            code = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.fail("did not exit after the transfers")
        self.reader.join(timeout=10)
        return code

    def fail(self, why):
        # What KVM does for the stuck guest (a halted vCPU waiting for an interrupt, or one that
        # keeps exiting), before it is stopped.
        trace = kvm_trace(2.0) if self.proc.poll() is None else ""
        # SIGTERM first: our VMM then writes exit.json, with the device's counters.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        tail = self.text().splitlines()[-40:]
        exit_json = os.path.join(self.vm_dir, "exit.json")
        counters = ""
        if os.path.exists(exit_json):
            with open(exit_json) as f:
                counters = "\nexit.json: " + f.read()
        raise RuntimeError(f"{why}; console tail:\n  " + "\n  ".join(tail) + counters + trace)


def kvm_trace(seconds):
    """KVM's tracepoints for `seconds`: how often each fired, and the last few. Empty when the
    kernel has no tracefs (or this is not root)."""
    root = "/sys/kernel/tracing"
    try:
        if not os.path.exists(os.path.join(root, "events")):
            subprocess.run(["mount", "-t", "tracefs", "tracefs", root], capture_output=True)
        with open(os.path.join(root, "trace"), "w") as f:
            f.write("")
        with open(os.path.join(root, "events/kvm/enable"), "w") as f:
            f.write("1")
        time.sleep(seconds)
        with open(os.path.join(root, "events/kvm/enable"), "w") as f:
            f.write("0")
        with open(os.path.join(root, "trace")) as f:
            lines = [l for l in f.read().splitlines() if not l.startswith("#")]
    except OSError as e:
        return f"\nkvm trace: unavailable ({e})"
    counts = {}
    for l in lines:
        m = re.search(r"\s(kvm_[a-z_0-9]+):", l)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    # The last line of each kind (exit reasons, fault addresses and injected vectors show
    # there), then the last lines in order.
    last = {}
    for l in lines:
        m = re.search(r"\s(kvm_[a-z_0-9]+):", l)
        if m:
            last[m.group(1)] = l.strip()
    return (f"\nkvm trace over {seconds:.0f} s: {len(lines)} events ({summary or 'none'})\n  "
            + "\n  ".join(last.values()) + "\n  last lines:\n  " + "\n  ".join(lines[-20:]))


def connect_retry(addr, deadline):
    deadline = min(deadline, time.monotonic() + 60)
    while True:
        try:
            return socket.create_connection(addr, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def one_round(args, kernel, build, tap, host_ip, guest_ip, mac):
    """Returns (host->guest MB/s, guest->host MB/s) for one boot."""
    total = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as d, socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host_ip, G2H_PORT))
        listener.listen(1)
        extra = f"nanoclaw.net={guest_ip},{host_ip},{args.mib}"
        if args.verbose:
            extra += " nanoclaw.net_verbose"
        guest = Guest(build(args, kernel, d, tap, mac, extra), d)
        deadline = time.monotonic() + TIMEOUT
        guest.wait_ready(deadline)

        # host -> guest
        buf = b"\0" * CHUNK
        t0 = time.monotonic()
        try:
            s = connect_retry((guest_ip, H2G_PORT), deadline)
        except OSError as e:
            guest.fail(f"cannot reach the guest's port {H2G_PORT}: {e}")
        with s:
            s.settimeout(TIMEOUT)
            sent = 0
            while sent < total:
                n = s.send(buf[: min(CHUNK, total - sent)])
                sent += n
            s.shutdown(socket.SHUT_WR)
            listener.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                guest.fail("the guest never connected back after host->guest")
            h2g = time.monotonic() - t0

        # guest -> host
        with conn:
            # A stream that stops for STALL seconds has stalled: fail with the guest's view.
            conn.settimeout(STALL)
            got = 0
            t1 = time.monotonic()
            while True:
                try:
                    chunk = conn.recv(CHUNK)
                except socket.timeout:
                    guest.fail(f"guest->host stalled after {got} bytes")
                if not chunk:
                    break
                got += len(chunk)
                if time.monotonic() > deadline:
                    guest.fail(f"guest->host still running at the deadline, {got} bytes")
            g2h = time.monotonic() - t1
        if got != total:
            guest.fail(f"guest->host carried {got} bytes, not {total}")
        guest.wait_exit(deadline)
    if args.verbose:
        text = guest.text()
        if "NANOCLAW-NET-STATS" in text:
            stats = text.split("NANOCLAW-NET-STATS", 1)[1].split("NANOCLAW-NET-END", 1)[0]
            keep = [l for l in stats.splitlines()
                    if l.startswith(("Tcp:", "Ip:")) or "eth0" in l or "virtio" in l]
            print("    guest: " + "\n    guest: ".join(keep))
        host = subprocess.run(["ip", "-s", "link", "show", tap], capture_output=True, text=True)
        print("    host:  " + "\n    host:  ".join(host.stdout.splitlines()), flush=True)
    mb = total / 1e6
    return mb / h2g, mb / g2h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--only", help="one VMM: ours, qemu or qemu-nooffload")
    p.add_argument("--keep-going", action="store_true",
                   help="count a boot that fails and go on, instead of stopping")
    p.add_argument("--vmm", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    args = p.parse_args()

    vmms = [("ours", ours, "nbt0", "10.77.0"),
            ("qemu", qemu_with(True), "nbt1", "10.77.1"),
            ("qemu-nooffload", qemu_with(False), "nbt2", "10.77.2")]
    if args.only:
        vmms = [v for v in vmms if v[0] == args.only]
        if not vmms:
            p.error(f"--only: no VMM named {args.only}")
    for _, _, tap, net in vmms:
        make_tap(tap, f"{net}.1")
    print(f"bench-net: {args.runs} interleaved rounds of {args.mib} MiB each way, {MEM_MIB} MiB "
          "guest, 1 vCPU; QEMU microvm virtio-net-device, vhost=off"
          + ("; each VMM kept on CPU 0" if PIN else ""), flush=True)
    figures = {name: ([], []) for name, *_ in vmms}
    failed = {name: 0 for name, *_ in vmms}
    try:
        for r in range(args.runs + 1):  # round 0 warms up (page cache, first VM) and is dropped
            for name, build, tap, net in vmms:
                try:
                    h2g, g2h = one_round(args, args.kernel, build, tap, f"{net}.1",
                                         f"{net}.2", "02:00:00:00:00:07")
                except RuntimeError as e:
                    if not args.keep_going:
                        raise
                    failed[name] += 1
                    print(f"  {name}: boot failed: {str(e).splitlines()[0]}", flush=True)
                    text = str(e)
                    tail = [l for l in text.splitlines() if "KVM_EXIT" in l or "exit.json" in l]
                    for line in tail:
                        print(f"    {line[:300]}", flush=True)
                    if "kvm trace" in text:
                        print("    " + text[text.index("kvm trace"):].replace("\n", "\n    "),
                              flush=True)
                    continue
                tag = "warm-up" if r == 0 else f"round {r}"
                print(f"  {tag:8} {name:15} host->guest {h2g:7.1f} MB/s   "
                      f"guest->host {g2h:7.1f} MB/s", flush=True)
                if r:
                    figures[name][0].append(h2g)
                    figures[name][1].append(g2h)
    finally:
        for _, _, tap, _ in vmms:
            subprocess.run(["ip", "link", "del", tap], stderr=subprocess.DEVNULL)
    for n, count in failed.items():
        if count:
            print(f"{n}: {count} boot(s) failed (left out of the medians)")
    med = {n: (statistics.median(a), statistics.median(b)) for n, (a, b) in figures.items() if a}
    if len(med) < len(figures):
        print("no figures for: " + ", ".join(n for n in figures if n not in med))
        return 1
    print("medians:")
    for n, (a, b) in med.items():
        print(f"  {n:15} host->guest {a:7.1f} MB/s   guest->host {b:7.1f} MB/s")
    print("ratios ours/QEMU (target >= 0.8):")
    for q in [q for q in ("qemu", "qemu-nooffload") if q in med and "ours" in med]:
        print(f"  ours/{q:15} host->guest {med['ours'][0] / med[q][0]:.2f}   "
              f"guest->host {med['ours'][1] / med[q][1]:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
