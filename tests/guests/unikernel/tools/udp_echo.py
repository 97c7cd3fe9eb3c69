#!/usr/bin/env python3
"""UDP echo server for the unikernel's net check (checks=net netudp=N).

Echoes every datagram back to its sender, at once and as it came (the guest
resends what it does not get back in order, so the server sees and echoes
some datagrams twice). It keeps the first copy of each sequence number and,
when it has them all, prints the FNV-1a 32 over their payloads in sequence
order: the guest prints the same hash over what it sent
(`NET udp sent=<bytes> fnv=<8hex>`, in sequence order) and over the echoes it
took (`NET udp received=<bytes> fnv=<8hex>`, in sequence order too).

Usage: udp_echo.py [--bind 10.77.0.1] [--port 7777] [--mib N] [--timeout S]
       udp_echo.py --expect N     (print the guest's fnv for netudp=N)
--drop N loses about one datagram in N on purpose (seeded, so runs repeat),
half of them as if lost on the way in (not kept, not echoed), half on the
way back (kept, not echoed): the guest must resend to finish.
With --mib N it keeps echoing until it has every datagram of N MiB and the
guest has been quiet for --linger seconds (default 3), then prints
`ECHO bytes=<n> fnv=<8hex> datagrams=<n> unique=<n> bad=<n> seconds=<s>` and
exits 0 if it has them all and none was bad (not what the guest must send),
else 1. Without --mib it runs until the idle timeout (default 60 s).

Datagram format (guest -> host): the UDP payload of datagram `seq`
(0, 1, 2, ...) is `len = min(1472, total - seq*1472)` bytes, total = N MiB:
bytes 0-3 are seq as a big-endian u32, byte k (4 <= k < len) is
(seq*31 + k) & 0xff. Source and destination port are both --port.
"""
import argparse
import random
import socket
import struct
import sys
import time

DGRAM = 1472
RAMP = bytes(range(256)) * 8


def fnv1a(h, data):
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def expected(seq, total):
    n = min(DGRAM, total - seq * DGRAM)
    start = (seq * 31 + 4) & 0xFF
    return struct.pack(">I", seq) + RAMP[start : start + n - 4]


def guest_fnv(mib):
    """The fnv the guest prints for netudp=mib (sent, and received)."""
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
    ap.add_argument("--linger", type=float, default=3.0)
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--drop", type=int, default=0)
    args = ap.parse_args()
    if args.expect:
        total, h = guest_fnv(args.expect)
        print("bytes=%d fnv=%08x" % (total, h))
        return
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((args.bind, args.port))
    total = args.mib * 1048576
    dgrams = (total + DGRAM - 1) // DGRAM
    got = [None] * dgrams
    unique, count, bad, first, dropped = 0, 0, 0, None, 0
    rng = random.Random(7)
    print("ECHO listening %s:%d" % (args.bind, args.port), flush=True)
    s.settimeout(args.timeout)
    try:
        while True:
            data, peer = s.recvfrom(65536)
            count += 1
            lose = args.drop and rng.randrange(args.drop) == 0
            if lose and count & 1:
                dropped += 1
                continue  # lost on the way in
            if lose:
                dropped += 1  # lost on the way back
            else:
                s.sendto(data, peer)
            if first is None:
                first = time.monotonic()
            if not total:
                continue
            seq = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else -1
            if seq < 0 or seq >= dgrams or data != expected(seq, total):
                bad += 1
            elif got[seq] is None:
                got[seq] = data
                unique += 1
                if unique == dgrams:
                    s.settimeout(args.linger)  # echo resends until the guest is quiet
    except socket.timeout:
        pass
    seconds = (time.monotonic() - first) if first is not None else 0.0
    h, nbytes = 0x811C9DC5, 0
    for d in got:
        if d is None:
            break
        h = fnv1a(h, d)
        nbytes += len(d)
    print(
        "ECHO bytes=%d fnv=%08x datagrams=%d unique=%d bad=%d dropped=%d seconds=%.1f"
        % (nbytes, h, count, unique, bad, dropped, seconds),
        flush=True,
    )
    sys.exit(0 if not total or (unique == dgrams and not bad) else 1)


if __name__ == "__main__":
    main()
