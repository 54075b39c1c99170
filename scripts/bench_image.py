#!/usr/bin/env python3
"""scripts/bench-image's inside (where KVM can boot Linux): interleaved `nanoclaw run` rounds
in the initramfs guest and in the agent-python image, timed from the CLI's start to the agent's
exit. Prints each round, the medians and the ratio image / initramfs."""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - start
    if out.returncode != 0 or "ready" not in out.stdout:
        raise SystemExit(f"bench-image: error: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return took


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
    finally:
        daemon.terminate()
        daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
