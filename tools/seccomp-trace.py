#!/usr/bin/env python3
"""Summarises `strace -f -ff -X raw` traces of tern and its backends per
binary and thread kind (see tools/seccomp-trace.sh)."""
import collections
import os
import re
import sys

LINE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\w+)")
CLONE_THREAD = 0x10000
PR_SET_NAME, PR_GET_SECCOMP = 0xF, 0x15
# Which argument (0-based) of which syscall the filters condition on.
ARGS = {"ioctl": 1, "socket": 0, "mmap": 3, "mprotect": 2, "fcntl": 1, "prctl": 0,
        "futex": 1, "madvise": 2, "seccomp": 0, "rt_sigprocmask": 0, "setsockopt": 1,
        "getsockopt": 1, "epoll_ctl": 1, "clone": 0, "clone3": 0, "sendmsg": 2, "recvmsg": 2}


def split_args(s):
    out, depth, cur, quote = [], 0, "", False
    for i, ch in enumerate(s):
        if ch == '"' and (i == 0 or s[i - 1] != "\\"):
            quote = not quote
        if not quote:
            if ch in "[{(":
                depth += 1
            elif ch in "]})":
                depth -= 1
            elif ch == "," and depth == 0:
                out.append(cur.strip())
                cur = ""
                continue
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse(path):
    calls = []
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                calls.append((m.group(1), split_args(m.group(2)), m.group(3)))
    return calls


def main(d):
    files = {}
    for name in os.listdir(d):
        base, _, tid = name.rpartition(".")
        files[int(tid)] = (base, parse(os.path.join(d, name)))
    parent, is_thread, clone_at = {}, {}, {}
    for tid, (_, calls) in files.items():
        for i, (sc, args, ret) in enumerate(calls):
            if sc in ("clone", "clone3", "fork", "vfork") and ret.lstrip("-").isdigit() and int(ret) > 0:
                child = int(ret)
                flags = 0
                if sc == "clone3" and args:
                    m = re.search(r"flags=(0x[0-9a-f]+|\d+)", args[0])
                    flags = int(m.group(1), 0) if m else 0
                elif sc == "clone" and args:
                    m = re.search(r"flags=(0x[0-9a-f]+|\d+)", ",".join(args))
                    flags = int(m.group(1), 0) if m else 0
                parent[child], is_thread[child], clone_at[child] = tid, bool(flags & CLONE_THREAD), i

    def leader(tid):
        while is_thread.get(tid):
            tid = parent[tid]
        return tid

    def binary(tid):
        for sc, args, ret in reversed(files.get(leader(tid), ("", []))[1]):
            if sc == "execve" and ret == "0":
                return os.path.basename(args[0].strip('"'))
        return files.get(tid, ("?",))[0]

    def tname(tid):
        for sc, args, ret in files[tid][1]:
            if sc == "prctl" and args and args[0] in (hex(PR_SET_NAME), str(PR_SET_NAME)):
                return args[1].strip('"')
        return "<main>" if leader(tid) == tid else "<unnamed>"

    def marker(tid):
        for i, (sc, args, _) in enumerate(files[tid][1]):
            if sc == "prctl" and args and args[0] in (hex(PR_GET_SECCOMP), str(PR_GET_SECCOMP)):
                return i
        return None

    def kind(b, name):
        if b == "tern":
            if name == "api":
                return "api"
            if name.startswith("vcpu"):
                return "vcpu"
            return "vmm"
        return "worker" if name == "vring_worker" else "main"

    def inherited(tid):
        """The kind whose filter a thread inherited from its creator, if any."""
        p = parent.get(tid)
        if p is None or p not in files:
            return None
        m = marker(p)
        if m is not None and clone_at[tid] > m:
            return kind(binary(p), tname(p)) if is_thread.get(tid) else None
        return inherited(p) if is_thread.get(tid) else None

    seen = collections.defaultdict(lambda: collections.defaultdict(set))
    for tid, (_, calls) in files.items():
        b = binary(tid)
        if b not in ("tern", "tern-blk", "tern-net"):
            continue
        m = marker(tid)
        k = kind(b, tname(tid))
        spans = []
        inh = inherited(tid)
        if inh:
            spans.append((inh, calls))
            if m is not None:
                spans.append((k, calls[m + 1:]))
        elif m is not None:
            spans.append((k, calls[m + 1:]))
        for kk, cs in spans:
            for sc, args, _ in cs:
                a = ARGS.get(sc)
                v = args[a] if a is not None and len(args) > a else ""
                seen[(b, kk)][sc].add(v[:60])
    for (b, k) in sorted(seen):
        print(f"== {b} {k}")
        for sc in sorted(seen[(b, k)]):
            vals = sorted(x for x in seen[(b, k)][sc] if x)
            print(f"  {sc}" + (f"  [{' '.join(vals)}]" if vals else ""))


if __name__ == "__main__":
    main(sys.argv[1])
