#!/usr/bin/env python3
"""Upstream services for the proxy's system tests (standard library only).

HTTP (--http HOST:PORT):
  GET /healthz            200 "ok"
  GET /stream?seconds=N   streams N*10 lines of 64 bytes, one every 100 ms
  GET /bytes?n=N          N bytes (chunked), for long downloads
  any other GET           200 "<name> <path>\\n"
TCP (--tcp HOST:PORT): echoes every byte back; a line "name\\n" is answered with
"<name>\\n" (so a test can see which upstream it reached).
"""

import argparse
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LINE = b"x" * 63 + b"\n"


def http_handler(name):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send_body(self, body, status=200):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_chunked(self, chunks):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk, pause in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                if pause:
                    time.sleep(pause)
            self.wfile.write(b"0\r\n\r\n")

        def do_GET(self):
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path == "/healthz":
                self.send_body(b"ok\n")
            elif url.path == "/stream":
                seconds = float(query.get("seconds", ["5"])[0])
                self.send_chunked((LINE, 0.1) for _ in range(int(seconds * 10)))
            elif url.path == "/bytes":
                n = int(query.get("n", ["1048576"])[0])
                block = b"y" * 65536
                chunks = [block] * (n // len(block))
                if n % len(block):
                    chunks.append(block[: n % len(block)])
                self.send_chunked((c, 0) for c in chunks)
            else:
                self.send_body(f"{name} {url.path}\n".encode())

    return Handler


class EchoHandler(socketserver.BaseRequestHandler):
    name = "tcp"

    def handle(self):
        sock = self.request
        pending = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            pending += data
            if pending.endswith(b"name\n"):
                sock.sendall(pending[: -len(b"name\n")] + self.name.encode() + b"\n")
                pending = b""
            elif b"\n" in pending or len(pending) > 4096:
                sock.sendall(pending)
                pending = b""
        if pending:
            sock.sendall(pending)
        sock.shutdown(socket.SHUT_WR)


class ThreadingTCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def split_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--http", action="append", default=[])
    parser.add_argument("--tcp", action="append", default=[])
    args = parser.parse_args()

    servers = []
    for addr in args.http:
        ThreadingHTTPServer.daemon_threads = True
        servers.append(ThreadingHTTPServer(split_addr(addr), http_handler(args.name)))
    for addr in args.tcp:
        handler = type("Echo", (EchoHandler,), {"name": args.name})
        servers.append(ThreadingTCPServer(split_addr(addr), handler))
    if not servers:
        parser.error("give --http and/or --tcp")
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
