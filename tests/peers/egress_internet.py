"""The "internet" of the network egress test: one host, in a network namespace the test made,
that serves what an agent's allowlist may or may not reach.

- DNS on UDP 53: `A` answers for the names given (all at --addr), an empty answer for `AAAA`,
  NXDOMAIN for any other name. Each query is logged.
- HTTPS on 443 (the certificate given, for every name): a PEP 503 package index at `/simple/`
  holding one small wheel, `nc-egress-demo`, built here, and `/hello`, which answers with the
  TLS server name the client sent.
- HTTP on 80: one line, so that a connection the guest should never make would succeed if it
  were let through.

Usage: egress_internet.py --addr A.B.C.D --cert PEM --key PEM --log FILE NAME...
"""

import argparse
import base64
import hashlib
import http.server
import io
import socket
import socketserver
import ssl
import struct
import sys
import threading
import zipfile

PACKAGE = "nc-egress-demo"
MODULE = "nc_egress_demo"
VERSION = "1.0"
VALUE = "installed through the egress allowlist"


def build_wheel():
    """A pure-Python wheel whose module holds VALUE, with a RECORD pip can check."""
    dist = f"{MODULE}-{VERSION}.dist-info"
    files = {
        f"{MODULE}/__init__.py": f"VALUE = {VALUE!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: nanoclaw-e2e\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return f"{MODULE}-{VERSION}-py3-none-any.whl", out.getvalue()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("names", nargs="+")
    a = p.parse_args()
    names = {n.lower() for n in a.names}
    log_lock = threading.Lock()
    log_file = open(a.log, "a", buffering=1)

    def log(line):
        with log_lock:
            log_file.write(line + "\n")

    wheel_name, wheel = build_wheel()
    wheel_sha = hashlib.sha256(wheel).hexdigest()

    def dns():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((a.addr, 53))
        while True:
            q, peer = s.recvfrom(4096)
            if len(q) < 12:
                continue
            qid, _flags, qd = struct.unpack(">HHH", q[:6])
            i, labels = 12, []
            while i < len(q) and q[i] != 0:
                n = q[i]
                labels.append(q[i + 1:i + 1 + n].decode(errors="replace"))
                i += 1 + n
            question = q[12:i + 5]
            qtype = struct.unpack(">H", q[i + 1:i + 3])[0] if i + 3 <= len(q) else 0
            name = ".".join(labels).lower()
            log(f"dns {name} type {qtype} from {peer[0]}")
            known = name in names
            rcode = 0 if known else 3
            answers = b""
            if known and qtype == 1:
                answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(a.addr)
            head = struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, 1 if answers else 0, 0, 0)
            s.sendto(head + question + answers, peer)

    class Index(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def send(self, code, body, kind="text/html"):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            sni = getattr(self.connection, "nc_sni", None)
            log(f"https {self.path} sni {sni} from {self.client_address[0]}")
            if self.path == "/hello":
                self.send(200, f"hello from {sni}\n".encode(), "text/plain")
            elif self.path.rstrip("/") == "/simple":
                self.send(200, f'<a href="/simple/{PACKAGE}/">{PACKAGE}</a>\n'.encode())
            elif self.path.rstrip("/") == f"/simple/{PACKAGE}":
                self.send(200, f'<a href="/files/{wheel_name}#sha256={wheel_sha}">{wheel_name}</a>\n'.encode())
            elif self.path == f"/files/{wheel_name}":
                self.send(200, wheel, "application/octet-stream")
            else:
                self.send(404, b"not here\n", "text/plain")

        def log_message(self, *args):
            pass

    class Plain(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log(f"http {self.path} from {self.client_address[0]}")
            body = b"plain http: this should never have been reached\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)

    def remember_sni(sock, server_name, _ctx):
        sock.nc_sni = server_name

    ctx.sni_callback = remember_sni

    class TlsServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

        def get_request(self):
            conn, peer = self.socket.accept()
            conn.settimeout(30)
            try:
                return ctx.wrap_socket(conn, server_side=True), peer
            except (ssl.SSLError, OSError) as e:
                log(f"tls handshake failed from {peer[0]}: {e}")
                conn.close()
                raise

    class PlainServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    https = TlsServer((a.addr, 443), Index)
    plain = PlainServer((a.addr, 80), Plain)
    threading.Thread(target=dns, daemon=True).start()
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    log("ready")
    print("ready", flush=True)
    https.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
