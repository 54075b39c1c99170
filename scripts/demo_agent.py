#!/usr/bin/env python3
"""The demo's inside: a real Python agent (examples/agents/python, the official `openai` and
`mcp` SDKs) in its Debian image, in a microVM, along the whole Nanoclaw path. It runs where KVM
can boot Linux (inside scripts/nested-run on our machines) and uses only the standard library.

What it sets up, all on loopback:
- an OpenAI-compatible LLM server (tests/peers/openai_server.py) over HTTPS with a CA only the
  device trusts, which demands the API key and scripts the model's turns;
- the daemon (`host-agent serve`) with the credential relay, passkey approvals and the image
  store that holds the agent's image;
- the user's device (`vault-device`): it holds the API key, pairs with the daemon and makes the
  LLM calls; the key never reaches the host or the guest;
- the MCP upstream the worker profile names (tests/peers/mcp_upstream.py), whose read_file
  returns a card number and an email.

Then `nanoclaw run --image agent-python --profile ... --copy examples/agents/python:/opt/agent
-- python3 /opt/agent/agent.py TASK` and a narrated summary. Everything it made stays in --work
(the LLM server's record, the upstream's log, the daemon's state and log, the agent's output),
which the end-to-end test checks.

  scripts/demo_agent.py --work DIR --bin-dir target/release --guest-manifest M --image-store S
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = "agent-python"
TASK = (
    "Summarise the order in /data/orders/latest.txt into /data/out/summary.txt, "
    "then delete /data/orders/latest.txt."
)
# How long the delete waits for the user's passkey before it is denied.
APPROVAL_WAIT_SECS = 15


def say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


class Processes:
    """Started processes, ended (SIGTERM, then SIGKILL) in reverse order on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, **kw) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run(args: list[str], **kw) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)
    if out.returncode != 0:
        raise SystemExit(f"demo: error: {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def wait_for(what: str, check, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: error: timed out waiting for {what}")
        time.sleep(0.1)


def make_certs(d: Path) -> None:
    """A CA that only the device trusts, and a certificate for api.test signed by it."""
    ssl = lambda *a: run(["openssl", *a], cwd=d)
    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=nanoclaw demo CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=api.test")
    (d / "leaf.ext").write_text(
        "subjectAltName=DNS:api.test\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_text(llm_host: str, python: str, peer_log: Path) -> str:
    """examples/profiles/worker.toml with this run's LLM host and upstream command."""
    text = (REPO / "examples/profiles/worker.toml").read_text()
    text = text.replace('llm_hosts = ["api.anthropic.com"]', f'llm_hosts = ["{llm_host}"]')
    upstream = REPO / "tests/peers/mcp_upstream.py"
    text = text.replace(
        'command = ["python3", "tests/peers/mcp_upstream.py"]',
        f'command = ["{python}", "{upstream}"]\nenv = {{ NANOCLAW_PEER_LOG = "{peer_log}" }}',
    )
    if llm_host not in text or str(upstream) not in text:
        raise SystemExit("demo: error: examples/profiles/worker.toml no longer has the lines the demo adapts")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="an empty folder for everything the demo makes")
    p.add_argument("--bin-dir", type=Path, required=True, help="where host-agent, nanoclaw and vault-device are")
    p.add_argument("--guest-manifest", type=Path, required=True)
    p.add_argument("--image-store", type=Path, required=True, help="the store holding the agent-python image")
    p.add_argument("--mcp-python", default=os.path.expanduser("~/.cache/nanoclaw/mcp-venv/bin/python3"))
    a = p.parse_args()
    w = a.work.resolve()
    w.mkdir(parents=True, exist_ok=True)
    bins = a.bin_dir.resolve()
    # L1's init leaves loopback down; everything here talks over it.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)

    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return demo(a, w, bins, procs)
    finally:
        procs.stop()


def demo(a, w: Path, bins: Path, procs: Processes) -> int:
    make_certs(w)
    key = "sk-demo-" + secrets.token_hex(24)
    key_file = w / "llm-key"
    key_file.write_text(key)
    key_file.chmod(0o600)

    say("starting the LLM server (HTTPS, scripted turns, demands the API key)")
    port_file = w / "llm-port"
    procs.start([sys.executable, str(REPO / "tests/peers/openai_server.py"),
                 "--tls-cert", str(w / "leaf.pem"), "--tls-key", str(w / "leaf.key"),
                 "--key-file", str(key_file), "--script", str(REPO / "tests/peers/agent_conversation.json"),
                 "--record", str(w / "llm-record.jsonl"), "--port", "0", "--port-file", str(port_file)],
                w / "llm-server.log")
    wait_for("the LLM server", lambda: port_file.exists() and port_file.read_text().strip())
    llm_port = int(port_file.read_text().strip())
    llm_host = f"api.test:{llm_port}"

    say("starting the daemon (credential relay, passkey approvals, image store)")
    device_port = free_port()
    state = w / "state"
    socket = w / "api.sock"
    daemon = procs.start([str(bins / "host-agent"), "serve", "--state-dir", str(state), "--socket", str(socket),
                 "--guest-manifest", str(a.guest_manifest), "--image-store", str(a.image_store),
                 "--device-listen", f"127.0.0.1:{device_port}",
                 "--approvals-listen", f"127.0.0.1:{free_port()}",
                 "--approvals-ttl-secs", str(APPROVAL_WAIT_SECS)],
                w / "daemon.log")
    code_file = state / "relay/pairing-code"
    wait_for("the pairing code", code_file.exists)

    say("the device: a sealed vault holds the API key; pair with the daemon; grant it to the agent")
    vault = w / "device.vault"
    env = dict(os.environ, VAULT_DEVICE_PASSPHRASE="demo passphrase")
    vd = [str(bins / "vault-device"), "--vault", str(vault)]
    run([*vd, "init", "--kdf-memory-kib", "1024", "--kdf-iterations", "1"], env=env)
    run([*vd, "add", "openai", "--host", llm_host, "--header", "Authorization", "--format", "Bearer {}"],
        env=env, input=key)
    run([*vd, "pair", "--host", f"127.0.0.1:{device_port}", "--code", code_file.read_text().strip()], env=env)
    # A grant names the paired host it is for: here the only one.
    run([*vd, "grant", "openai", "--host", llm_host, "--vm", "*", "--ttl", "600"], env=env)
    procs.start([*vd, "serve", "--ca-file", str(w / "ca.pem"), "--resolve", f"api.test=127.0.0.1:{llm_port}"],
                w / "device.log", env=env)

    profile = w / "worker.toml"
    profile.write_text(profile_text(llm_host, a.mcp_python, w / "upstream.ndjson"))
    cmd = [str(bins / "nanoclaw"), "--socket", str(socket), "run", "--image", IMAGE,
           "--profile", str(profile), "--copy", f"{REPO / 'examples/agents/python'}:/opt/agent",
           "-e", "AGENT_MODEL=nanoclaw-scripted", "-e", "HOME=/home/agent",
           "--", "python3", "/opt/agent/agent.py", TASK]
    say(f"nanoclaw run --image {IMAGE} --profile worker.toml --copy examples/agents/python:/opt/agent "
        f"-- python3 /opt/agent/agent.py {TASK!r}")
    started = time.monotonic()
    with open(w / "agent.out", "wb") as out:
        agent = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        out.write(agent.stdout)
    sys.stdout.write(agent.stdout.decode(errors="replace"))
    (w / "agent.exit").write_text(str(agent.returncode))
    say(f"the agent exited with status {agent.returncode} after {time.monotonic() - started:.0f} s")
    scan = key_scan(w, key, daemon.pid)
    (w / "key-scan.json").write_text(json.dumps(scan, indent=2))
    summarize(w, key, scan)
    verify = subprocess.run([str(bins / "nanoclaw"), "audit", "verify", "--file", str(state / "audit.ndjson")],
                            capture_output=True, text=True)
    say(f"audit log: {(verify.stdout + verify.stderr).strip()}")
    return agent.returncode


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of process `pid` holds `needle` (root reads /proc/PID/mem)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            tail = b""
            # Bounded reads; the tail carried over finds a needle that straddles two of them.
            for at in range(start, end, 16 << 20):
                try:
                    mem.seek(at)
                    chunk = tail + mem.read(min(16 << 20, end - at))
                except (OSError, ValueError, OverflowError):
                    break
                if needle in chunk:
                    found = True
                    break
                tail = chunk[-len(needle):]
            if found:
                break
    return found


def key_scan(w: Path, key: str, daemon_pid: int) -> dict:
    """Where the API key's bytes are on the host side: the daemon's memory, its log and every
    file of its state (the VM's writable disk included), checked while the daemon still runs."""
    needle = key.encode()
    files = [p for p in (w / "state").rglob("*") if p.is_file() and not p.is_symlink()]
    return {
        "daemon_memory": memory_holds(daemon_pid, needle),
        "daemon_log": needle in (w / "daemon.log").read_bytes(),
        "state_files_scanned": len(files),
        "state_files_holding_it": [str(p) for p in files if needle in p.read_bytes()],
    }


def summarize(w: Path, key: str, scan: dict) -> None:
    """What happened along the path, from the peers' own records."""
    try:
        requests = [json.loads(l) for l in (w / "llm-record.jsonl").read_text().splitlines() if l.strip()]
    except FileNotFoundError:
        requests = []
    matched = sum(1 for r in requests if r.get("key_matched"))
    say(f"the LLM server got {len(requests)} requests, {matched} with the real key "
        f"(the device injected it; the agent sent a placeholder)")
    seen = json.dumps([r.get("messages") for r in requests])
    say("the model saw the card number only as a surrogate" if "4111 1111 1111 1111" not in seen
        else "WARNING: the model saw the real card number")
    try:
        calls = [json.loads(l) for l in (w / "upstream.ndjson").read_text().splitlines() if l.strip()]
    except FileNotFoundError:
        calls = []
    say(f"the MCP upstream got {[c.get('tool') for c in calls]} (real values restored in arguments)")
    audit = (w / "state/audit.ndjson").read_text() if (w / "state/audit.ndjson").exists() else ""
    if '"expired"' in audit:
        say(f"delete_file waited {APPROVAL_WAIT_SECS} s for your passkey, got no answer, and was denied")
    clean = not (scan["daemon_memory"] or scan["daemon_log"] or scan["state_files_holding_it"])
    say(f"the API key is nowhere in the daemon's memory, log or state ({scan['state_files_scanned']} files, "
        "the VM's disk included)" if clean else f"WARNING: the key was found on the host: {scan}")


if __name__ == "__main__":
    sys.exit(main())
