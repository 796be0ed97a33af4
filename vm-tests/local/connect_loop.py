#!/usr/bin/env python3
"""Opens new connections in a loop and sorts every failure by kind (proxy system tests).

Each worker connects, sends one request (HTTP: `GET PATH` with `Connection: close`,
expecting a 200 with a body; TCP: one line, expecting its echo), reads the answer and
closes, then starts over at once. It runs until --stop-file exists or --duration seconds
have passed. The summary counts successes, refused connections (nothing listened on the
address: ECONNREFUSED) and other failures (reset, timeout, wrong answer) separately, and
the longest time one connection took, since a connection that arrives while no process
accepts waits in the listening socket's backlog.

usage: connect_loop.py [--http HOST:PORT] [--tcp HOST:PORT] [--workers N]
                       [--stop-file F] [--duration S] [--timeout S] [--out FILE]

Prints (and with --out writes) a JSON summary; exits 0 when at least one connection
succeeded and none failed in any way.
"""

import argparse
import json
import os
import socket
import sys
import threading
import time


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.refused = 0
        self.other = 0
        self.slowest = 0.0
        self.errors = []

    def success(self, seconds):
        with self.lock:
            self.ok += 1
            self.slowest = max(self.slowest, seconds)

    def failure(self, kind, err):
        with self.lock:
            if isinstance(err, ConnectionRefusedError):
                self.refused += 1
            else:
                self.other += 1
            if len(self.errors) < 20:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {kind}: {err!r}")


def split_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def read_all(sock):
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def http_once(addr, path, timeout):
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {addr[0]}\r\nConnection: close\r\n\r\n".encode()
        )
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200 ") or not body:
        raise ValueError(f"answer {data[:80]!r}")


def tcp_once(addr, line, timeout):
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if data != line:
        raise ValueError(f"echo {data!r} != {line!r}")


def worker(kind, once, running, tally):
    while running():
        t0 = time.monotonic()
        try:
            once()
            tally.success(time.monotonic() - t0)
        except Exception as err:  # noqa: BLE001 - every failure counts
            tally.failure(kind, err)
            # A refused connect returns at once; do not spin on it.
            time.sleep(0.005)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--http", help="HOST:PORT of an HTTP listener")
    parser.add_argument("--path", default="/", help="request path")
    parser.add_argument("--tcp", help="HOST:PORT of a TCP listener (echo upstream)")
    parser.add_argument("--workers", type=int, default=2, help="per address")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (upper bound)")
    parser.add_argument("--stop-file", help="stop when this file exists")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per connection")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args()
    if not args.http and not args.tcp:
        parser.error("give --http and/or --tcp")

    deadline = time.monotonic() + args.duration

    def running():
        if time.monotonic() >= deadline:
            return False
        return not (args.stop_file and os.path.exists(args.stop_file))

    tally = Tally()
    threads = []
    for i in range(args.workers):
        if args.http:
            addr = split_addr(args.http)
            threads.append(threading.Thread(
                target=worker,
                args=("http", lambda a=addr: http_once(a, args.path, args.timeout), running, tally),
            ))
        if args.tcp:
            addr = split_addr(args.tcp)
            line = f"loop {i}\n".encode()
            threads.append(threading.Thread(
                target=worker,
                args=("tcp", lambda a=addr, l=line: tcp_once(a, l, args.timeout), running, tally),
            ))
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = {
        "ok": tally.ok,
        "refused": tally.refused,
        "other_failures": tally.other,
        "slowest_seconds": round(tally.slowest, 3),
        "seconds": round(time.monotonic() - started, 1),
        "errors": tally.errors,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    sys.exit(0 if tally.ok > 0 and tally.refused == 0 and tally.other == 0 else 1)


if __name__ == "__main__":
    main()
