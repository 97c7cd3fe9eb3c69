#!/usr/bin/env python3
"""UDP echo server for the unikernel's net check (checks=net netudp=N).

Echoes every datagram back to its sender and keeps a running FNV-1a 32 over
the payloads it received, in arrival order, which is what the guest prints
as `NET udp sent=<bytes> fnv=<8hex>` (the guest hashes what it sent, in
sequence order) and, since the server echoes the same bytes in the same
order, `NET udp received=<bytes> fnv=<8hex>`.

Usage: udp_echo.py [--bind 10.77.0.1] [--port 7777] [--mib N] [--timeout S]
With --mib N it exits after N MiB (printing `ECHO bytes=<n> fnv=<8hex>
datagrams=<n> bad=<n>`; exit 0 if every datagram was what the guest must
send, else 1); without, it runs until the idle timeout (default 60 s).

Datagram format (guest -> host): the UDP payload of datagram `seq`
(0, 1, 2, ...) is `len = min(1472, total - seq*1472)` bytes, total = N MiB:
bytes 0-3 are seq as a big-endian u32, byte k (4 <= k < len) is
(seq*31 + k) & 0xff. Source and destination port are both --port.
"""
import argparse
import socket
import struct
import sys

DGRAM = 1472


def fnv1a(h, data):
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def expected(seq, total):
    n = min(DGRAM, total - seq * DGRAM)
    return struct.pack(">I", seq) + bytes(((seq * 31 + k) & 0xFF) for k in range(4, n))


def guest_fnv(mib):
    """The fnv the guest prints for netudp=mib (sent, and received in order)."""
    total = mib * 1048576
    h = 0x811C9DC5
    for seq in range((total + DGRAM - 1) // DGRAM):
        h = fnv1a(h, expected(seq, total))
    return total, h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", default="10.77.0.1")
    ap.add_argument("--port", type=int, default=7777)
    ap.add_argument("--mib", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((args.bind, args.port))
    s.settimeout(args.timeout)
    total = args.mib * 1048576
    h, nbytes, count, bad = 0x811C9DC5, 0, 0, 0
    print("ECHO listening %s:%d" % (args.bind, args.port), flush=True)
    try:
        while not total or nbytes < total:
            data, peer = s.recvfrom(65536)
            s.sendto(data, peer)
            h = fnv1a(h, data)
            nbytes += len(data)
            count += 1
            if total:
                seq = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else -1
                if seq < 0 or seq * DGRAM >= total or data != expected(seq, total):
                    bad += 1
    except socket.timeout:
        pass
    print("ECHO bytes=%d fnv=%08x datagrams=%d bad=%d" % (nbytes, h, count, bad), flush=True)
    sys.exit(0 if total and nbytes == total and not bad else (0 if not total else 1))


if __name__ == "__main__":
    main()
