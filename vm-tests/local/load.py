#!/usr/bin/env python3
"""Bounded load generator for the proxy's upgrade tests (standard library only).

Runs until --duration seconds have passed, every worker has sent --count requests, or
--stop-file exists, whichever comes first. Kinds of workers:

  --keepalive N   HTTP/1.1 clients that reuse one connection
  --fresh N       HTTP clients that open a new connection per request
  --tcp N         TCP clients that connect, send a line, read the echo, close
  --hold-tcp      one TCP connection kept open for the whole run, a line every 100 ms

A request fails on a connection error, a timeout, a status other than 200, or a short
body. As HTTP/1.1 clients do (RFC 9112, 9.3.1), a keep-alive request whose reused,
idle connection turns out to be closed before any byte of the response is retried once
on a new connection; those retries are counted, and a failed retry is a failure.

Prints (and with --out writes) a JSON summary; exits 0 only when nothing failed and at
least one request succeeded.
"""

import argparse
import http.client
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
        self.failed = 0
        self.stale_retries = 0
        self.errors = []

    def success(self):
        with self.lock:
            self.ok += 1

    def failure(self, kind, detail):
        with self.lock:
            self.failed += 1
            if len(self.errors) < 20:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {kind}: {detail}")

    def retried(self):
        with self.lock:
            self.stale_retries += 1


class Bounds:
    def __init__(self, duration, count, stop_file):
        self.deadline = time.monotonic() + duration
        self.count = count
        self.stop_file = stop_file

    def running(self, sent):
        if self.count and sent >= self.count:
            return False
        if time.monotonic() >= self.deadline:
            return False
        return not (self.stop_file and os.path.exists(self.stop_file))


def split_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def check_response(resp):
    body = resp.read()
    if resp.status != 200:
        raise ValueError(f"status {resp.status}")
    if not body:
        raise ValueError("empty body")
    length = resp.getheader("Content-Length")
    if length is not None and int(length) != len(body):
        raise ValueError(f"short body {len(body)}/{length}")
    return resp.getheader("Connection", "").lower() == "close"


STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def keepalive_worker(addr, path, headers, bounds, tally, timeout):
    host, port = addr
    conn = None
    sent = 0
    while bounds.running(sent):
        sent += 1
        reused = conn is not None
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers)
            close = check_response(conn.getresponse())
        except STALE as err:
            conn.close()
            conn = None
            if not reused:
                tally.failure("keepalive", repr(err))
                continue
            # An idle connection the server closed: retry once on a new one.
            tally.retried()
            try:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("GET", path, headers=headers)
                close = check_response(conn.getresponse())
            except Exception as err2:  # noqa: BLE001 - every failure counts
                tally.failure("keepalive-retry", repr(err2))
                conn.close()
                conn = None
                continue
        except Exception as err:  # noqa: BLE001
            tally.failure("keepalive", repr(err))
            conn.close()
            conn = None
            continue
        tally.success()
        if close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def fresh_worker(addr, path, headers, bounds, tally, timeout):
    host, port = addr
    sent = 0
    while bounds.running(sent):
        sent += 1
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers={**headers, "Connection": "close"})
            check_response(conn.getresponse())
            tally.success()
        except Exception as err:  # noqa: BLE001
            tally.failure("fresh", repr(err))
        finally:
            conn.close()


def read_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def tcp_worker(addr, bounds, tally, timeout):
    sent = 0
    while bounds.running(sent):
        sent += 1
        line = f"ping {threading.get_ident()} {sent}\n".encode()
        try:
            with socket.create_connection(addr, timeout=timeout) as sock:
                sock.sendall(line)
                echo = read_line(sock)
                if echo != line:
                    raise ValueError(f"echo {echo!r} != {line!r}")
                sock.shutdown(socket.SHUT_WR)
            tally.success()
        except Exception as err:  # noqa: BLE001
            tally.failure("tcp", repr(err))


def hold_tcp_worker(addr, bounds, tally, timeout):
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except Exception as err:  # noqa: BLE001
        tally.failure("hold-tcp", repr(err))
        return
    with sock:
        sent = 0
        while bounds.running(0):
            sent += 1
            line = f"held {sent}\n".encode()
            try:
                sock.sendall(line)
                echo = read_line(sock)
                if echo != line:
                    raise ValueError(f"echo {echo!r} != {line!r}")
                tally.success()
            except Exception as err:  # noqa: BLE001
                tally.failure("hold-tcp", repr(err))
                return
            time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", help="HOST:PORT of an HTTP listener")
    parser.add_argument("--path", default="/", help="request path")
    parser.add_argument("--host", help="Host header (default: from --http)")
    parser.add_argument("--tcp-addr", help="HOST:PORT of a TCP listener (echo upstream)")
    parser.add_argument("--keepalive", type=int, default=4)
    parser.add_argument("--fresh", type=int, default=4)
    parser.add_argument("--tcp", type=int, default=0)
    parser.add_argument("--hold-tcp", action="store_true")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (upper bound)")
    parser.add_argument("--count", type=int, default=0, help="requests per worker (0: no limit)")
    parser.add_argument("--stop-file", help="stop when this file exists")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args()

    bounds = Bounds(args.duration, args.count, args.stop_file)
    tally = Tally()
    threads = []
    headers = {"Host": args.host} if args.host else {}
    if args.http:
        addr = split_addr(args.http)
        for _ in range(args.keepalive):
            threads.append(threading.Thread(target=keepalive_worker, args=(addr, args.path, headers, bounds, tally, args.timeout)))
        for _ in range(args.fresh):
            threads.append(threading.Thread(target=fresh_worker, args=(addr, args.path, headers, bounds, tally, args.timeout)))
    if args.tcp_addr:
        addr = split_addr(args.tcp_addr)
        for _ in range(args.tcp):
            threads.append(threading.Thread(target=tcp_worker, args=(addr, bounds, tally, args.timeout)))
        if args.hold_tcp:
            threads.append(threading.Thread(target=hold_tcp_worker, args=(addr, bounds, tally, args.timeout)))
    if not threads:
        parser.error("no workers: give --http and/or --tcp-addr with --tcp/--hold-tcp")

    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = {
        "ok": tally.ok,
        "failed": tally.failed,
        "stale_retries": tally.stale_retries,
        "seconds": round(time.monotonic() - started, 2),
        "errors": tally.errors,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)
    sys.exit(0 if tally.failed == 0 and tally.ok > 0 else 1)


if __name__ == "__main__":
    main()
