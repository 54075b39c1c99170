#!/usr/bin/env python3
"""scripts/bench-image's inside (where KVM can boot Linux): interleaved `nanoclaw run` rounds
in the initramfs guest and in the agent-python image, timed from the CLI's start to the agent's
exit. Prints each round, the medians and the ratio image / initramfs. Then `nanoclaw cp` of a
100 MiB file into a running image VM and back out, checked byte for byte, in MB/s."""

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], expect: str = "ready") -> float:
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - start
    if out.returncode != 0 or expect not in out.stdout:
        raise SystemExit(f"bench-image: error: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return took


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def copy_rates(cli: list[str], work: Path, mib: int = 100) -> None:
    """`nanoclaw cp` of one MIB-MiB file into a running image VM and back, in MB/s."""
    out = subprocess.run(cli + ["run", "--image", "agent-python", "--disk-size", "512M", "--detach", "--",
                                "/bin/sh", "-c", "echo ready; while :; do sleep 1; done"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"bench-image: error: run --detach failed:\n{out.stderr}")
    vm = out.stdout.strip()
    try:
        deadline = time.monotonic() + 600
        while "ready" not in subprocess.run(cli + ["logs", vm], capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                raise SystemExit("bench-image: error: the copy VM never became ready")
            time.sleep(0.25)
        src = work / "payload.bin"
        with open(src, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        size_mb = src.stat().st_size / 1e6
        into = timed(cli + ["cp", str(src), f"{vm}:/root"], expect="copied")
        back = work / "back"
        back.mkdir()
        out_of = timed(cli + ["cp", f"{vm}:/root/payload.bin", str(back)], expect="copied")
        if digest(back / "payload.bin") != digest(src):
            raise SystemExit("bench-image: error: the file that came back differs")
        print(f"cp {mib} MiB into a running VM: {size_mb / into:.1f} MB/s ({into:.2f} s)")
        print(f"cp {mib} MiB out of a running VM: {size_mb / out_of:.1f} MB/s ({out_of:.2f} s)")
    finally:
        subprocess.run(cli + ["stop", vm], capture_output=True, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--bin-dir", type=Path, required=True)
    p.add_argument("--guest-manifest", type=Path, required=True)
    p.add_argument("--image-store", type=Path, required=True)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nanoclaw-bench-image."))
    sock = work / "api.sock"
    daemon = subprocess.Popen(
        [str(a.bin_dir / "host-agent"), "serve", "--state-dir", str(work / "state"), "--socket", str(sock),
         "--guest-manifest", str(a.guest_manifest), "--image-store", str(a.image_store)],
        stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline:
                raise SystemExit("bench-image: error: the daemon did not start")
            time.sleep(0.1)
        cli = [str(a.bin_dir / "nanoclaw"), "--socket", str(sock), "run"]
        script = ["--", "/bin/sh", "-c", "echo ready"]
        plain, image = [], []
        timed(cli + script)  # warm-up: page cache, first VM
        for i in range(a.runs):
            plain.append(timed(cli + script))
            image.append(timed(cli + ["--image", "agent-python", "--disk-size", "256M"] + script))
            print(f"round {i + 1}: initramfs {plain[-1]:.2f} s, image {image[-1]:.2f} s", flush=True)
        mp, mi = statistics.median(plain), statistics.median(image)
        print(f"run to agent exit, median of {a.runs}: initramfs {mp:.2f} s, image {mi:.2f} s")
        print(f"ratio image / initramfs: {mi / mp:.2f} (target <= 1.3; TCG-nested absolute times are context only)")
        copy_rates(cli[:-1], work)
    finally:
        daemon.terminate()
        daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
