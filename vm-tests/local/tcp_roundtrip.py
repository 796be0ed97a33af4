#!/usr/bin/env python3
"""Sends one line to HOST:PORT and prints the line that comes back (proxy system tests).

usage: tcp_roundtrip.py HOST:PORT LINE
"""

import socket
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    host, _, port = sys.argv[1].rpartition(":")
    line = (sys.argv[2] + "\n").encode()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as sock:
        sock.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    print(data.decode().strip())


if __name__ == "__main__":
    main()
