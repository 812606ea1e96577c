#!/usr/bin/env python3
"""Memory with many idle clients: opens N connections to herald, waits for
every greeting (and, with --ehlo, an EHLO reply; with --starttls, a finished
TLS handshake), then reads herald's resident memory from /proc. Prints one
JSON line and appends it to --out."""
import argparse
import json
import socket
import ssl
import time

ap = argparse.ArgumentParser()
ap.add_argument("--target", default="127.0.0.1:2525")
ap.add_argument("--connections", type=int, default=5000)
ap.add_argument("--pid", type=int, required=True)
ap.add_argument("--ehlo", action="store_true")
ap.add_argument("--starttls", action="store_true")
ap.add_argument("--out", required=True)
args = ap.parse_args()

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def read_reply(s):
    buf = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed")
        buf += chunk
        lines = buf.split(b"\r\n")
        for l in lines[:-1]:
            if len(l) >= 4 and l[3:4] == b" ":
                return l
host, port = args.target.rsplit(":", 1)
base = rss_kib(args.pid)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
socks = []
t0 = time.time()
for i in range(args.connections):
    s = socket.create_connection((host, int(port)), timeout=30)
    read_reply(s)
    if args.ehlo or args.starttls:
        s.sendall(b"EHLO idle.test\r\n")
        read_reply(s)
    if args.starttls:
        s.sendall(b"STARTTLS\r\n")
        read_reply(s)
        s = ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(b"EHLO idle.test\r\n")
        read_reply(s)
    socks.append(s)
t1 = time.time()
time.sleep(1.0)  # let the allocator settle before reading RSS
full = rss_kib(args.pid)
rec = {"scenario": "idle-connections", "connections": len(socks), "ehlo": args.ehlo,
       "starttls": args.starttls, "rss_before_mib": round(base / 1024, 1),
       "rss_with_idle_mib": round(full / 1024, 1),
       "kib_per_connection": round((full - base) / len(socks), 2),
       "open_s": round(t1 - t0, 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
print(json.dumps(rec))
with open(args.out, "a") as f:
    f.write(json.dumps(rec) + "\n")
for s in socks:
    s.close()
