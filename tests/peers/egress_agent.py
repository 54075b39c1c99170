"""The agent of the network egress test, run in a microVM whose profile allows only
`pkgs.test:443`: it installs a package with pip from the index there, then tries every other
way out, each attempt on one `TRY name seconds outcome` line, serves port 8080 for the host's
forwarded port, and waits to be stopped (so that the test can read the VM's counters and use
the forwarded port while it runs).

Usage: python3 egress_agent.py HOST_ADDR   (HOST_ADDR: the host's own address on the test link)
"""

import socket
import ssl
import struct
import subprocess
import sys
import time


def attempt(name, fn):
    started = time.monotonic()
    try:
        got = fn()
        outcome = f"OPEN {got!r}"
    except Exception as e:  # each refusal is reported, whatever its kind
        outcome = f"REFUSED {type(e).__name__}: {e}"
    print(f"TRY {name} {time.monotonic() - started:.2f} {outcome}", flush=True)


def body(s):
    """The answer's body (an HTTP/1.0 answer ends with the connection), at most 4 KiB read."""
    data = b""
    while len(data) < 4096:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    if not data:
        raise ConnectionError("closed without a byte")
    return data.split(b"\r\n\r\n", 1)[-1][:80]


def tcp(addr, port):
    with socket.create_connection((addr, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return body(s)


def tls(addr, server_name):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((addr, 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            s.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
            return body(s)


def dns_query(name, edns):
    """A raw `A` query, with an EDNS OPT record when `edns` (room for an Extended DNS Error)."""
    q = struct.pack(">HHHHHH", 0x4E43, 0x0100, 1, 0, 0, 1 if edns else 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", 1, 1)
    if edns:
        q += b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)
    return q


def ask(server, name):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((server, 53))
    s.send(dns_query(name, True))
    return s.recv(1500)


def nameserver():
    with open("/etc/resolv.conf") as f:
        for line in f:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                return words[1]
    raise RuntimeError("no nameserver in /etc/resolv.conf")


def main():
    host_addr = sys.argv[1]
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
         "--break-system-packages", "--index-url", "https://pkgs.test/simple/",
         "--trusted-host", "pkgs.test", "--target", "/tmp/site", "nc-egress-demo"],
        capture_output=True, text=True, timeout=300)
    print(f"PIP rc={pip.returncode} {pip.stdout.strip().splitlines()[-1:]} {pip.stderr.strip()[-400:]!r}", flush=True)
    sys.path.insert(0, "/tmp/site")
    try:
        import nc_egress_demo
        print(f"INSTALLED {nc_egress_demo.VALUE}", flush=True)
    except ImportError as e:
        print(f"INSTALLED none: {e}", flush=True)
    attempt("allowed", lambda: tls(socket.gethostbyname("pkgs.test"), "pkgs.test"))
    pkgs = socket.gethostbyname("pkgs.test")
    gateway = nameserver()
    refused = ask(gateway, "other.test")
    print(f"EDE {refused[3] & 15} {refused.decode('latin-1')!r}", flush=True)
    attempt("other_name", lambda: socket.getaddrinfo("other.test", 443))
    attempt("port_80", lambda: tcp(pkgs, 80))
    attempt("raw_ip", lambda: tls(pkgs, None))
    attempt("fronting", lambda: tls(pkgs, "other.test"))
    attempt("other_dns", lambda: ask(pkgs, "pkgs.test"))
    attempt("metadata", lambda: tcp("169.254.169.254", 80))
    attempt("host", lambda: tcp(host_addr, 80))
    attempt("gateway", lambda: tcp(gateway, 22))
    serve_inbound()
    print("AGENT-DONE", flush=True)
    time.sleep(3600)


def serve_inbound():
    """Port 8080 for the host's forwarded port (`nanoclaw run -p`): one line naming the peer."""
    import http.server
    import threading

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"inbound to the agent from {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("0.0.0.0", 8080), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()


if __name__ == "__main__":
    main()
