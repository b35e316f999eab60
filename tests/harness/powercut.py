"""Power cuts, replayed: the file-system calls of a real process, recorded
with ``strace``, and the states a power cut could leave behind.

``record(cmd, root)`` runs ``cmd`` under ``strace -f -y -xx`` and returns the
calls that touched ``root``, in the order they completed: every write (with
its bytes), create, rename, link, unlink, mkdir, rmdir, truncate, and every
``fsync``, ``fdatasync`` and ``syncfs``.

``Model(ops)`` then answers "what would the disk hold if the power went out
right after operation k?" under one of two models:

* ``ext4``: ext4 with ``data=ordered``.  ext4 has one journal, so any
  completed barrier (``fsync``, ``fdatasync`` or ``syncfs`` of anything)
  commits every metadata operation before it; after the last barrier, later
  metadata operations may be lost, in order from the end.  File data is
  durable only when a barrier covers it: an ``fsync``/``fdatasync`` of that
  file, or a ``syncfs``, after the write; data that was never synced may be
  missing or short.
* ``strict``: as above for data, but a metadata operation (a new name, a
  rename, an unlink) persists only when an ``fsync`` of its own directory,
  or a ``syncfs``, covers it; directories are independent of each other.
  ext4's ordered journal makes this moot; file systems that do not order
  metadata across directories do not.

``crash_states`` yields, for every crash point, the worst cases and a few
random mixes: unsynced data gone, kept or cut short, the uncommitted
metadata tail lost or kept (per directory, for ``strict``).  Each state is a
``{path: bytes}`` map of the files (directories implied).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TRACED = (
    "open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,rename,renameat,renameat2,link,linkat,"
    "unlink,unlinkat,mkdir,mkdirat,rmdir,fsync,fdatasync,syncfs,sync,ftruncate,truncate,lseek"
)
_LINE = re.compile(r"^(\d+) +(\w+)\((.*)\) += (-?\d+)(?:<(.*)>)?(?: .*)?$")
_UNFINISHED = re.compile(r"^(\d+) +(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>(.*)\) += (-?\d+)(?:<(.*)>)?(?: .*)?$")
_HEX = re.compile(r"\\x([0-9a-f]{2})")


def _unhex(text: str) -> bytes:
    return bytes(int(h, 16) for h in _HEX.findall(text))


def _split_args(args: str) -> list[str]:
    """Top-level arguments of an strace call (commas outside quotes, <> and {})."""
    out, depth, quoted, cur = [], 0, False, []
    i = 0
    while i < len(args):
        c = args[i]
        if quoted:
            cur.append(c)
            if c == "\\":
                cur.append(args[i + 1])
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
            cur.append(c)
        elif c in "<[{":
            depth += 1
            cur.append(c)
        elif c in ">]}":
            depth -= 1
            cur.append(c)
        elif c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if cur:
        out.append("".join(cur).strip())
    return out


def _string(arg: str) -> bytes:
    # "\x2f\x74..." possibly followed by "..." when strace cut it
    if arg.endswith('"...'):
        raise ValueError("strace truncated a string: raise -s")
    return _unhex(arg[1:-1]) if arg.startswith('"') else b""


def _fd_path(arg: str) -> str | None:
    m = re.match(r"^-?\d+<(.*)>$", arg)
    return _unhex(m.group(1)).decode("utf-8", "surrogateescape") if m else None


@dataclass(frozen=True)
class Op:
    kind: str  # create, write, truncate, rename, link, unlink, mkdir, rmdir, fsync, syncfs
    path: str = ""  # the file (or the directory, for fsync of a directory)
    dest: str = ""  # rename / link target
    data: bytes = b""
    offset: int = 0
    size: int = 0  # truncate length
    pid: int = 0


def _abs(base: str | None, path: bytes, cwd: str) -> str:
    p = path.decode("utf-8", "surrogateescape")
    if p.startswith("/"):
        return os.path.normpath(p)
    return os.path.normpath(os.path.join(base or cwd, p))


def parse(text: str, *, cwd: str) -> list[Op]:
    """strace -f -y -xx output -> the operations that succeeded, in completion order."""
    ops: list[Op] = []
    pending: dict[str, tuple[str, str]] = {}
    positions: dict[tuple[str, str], int] = {}  # (pid, fd path) -> write position (plain write())
    for line in text.splitlines():
        if m := _UNFINISHED.match(line):
            pending[m.group(1)] = (m.group(2), m.group(3))
            continue
        if m := _RESUMED.match(line):
            pid, name = m.group(1), m.group(2)
            started = pending.pop(pid, None)
            if started is None or started[0] != name:
                continue
            args, ret, retpath = started[1] + m.group(3), int(m.group(4)), m.group(5)
        elif m := _LINE.match(line):
            pid, name, args, ret, retpath = m.group(1), m.group(2), m.group(3), int(m.group(4)), m.group(5)
        else:
            continue
        if ret < 0:
            continue
        a = _split_args(args)
        ipid = int(pid)
        if name in ("open", "openat", "creat"):
            if name == "openat":
                base, path, flags = _fd_path(a[0].replace("AT_FDCWD", "-100")), _string(a[1]), a[2]
            else:
                base, path, flags = None, _string(a[0]), a[1] if len(a) > 1 else "O_CREAT|O_TRUNC"
            if name == "creat":
                flags = "O_CREAT|O_TRUNC"
            full = _unhex(retpath).decode("utf-8", "surrogateescape") if retpath else _abs(base, path, cwd)
            positions[(pid, full)] = 0
            if "O_CREAT" in flags:
                ops.append(Op("create", full, pid=ipid))
            if "O_TRUNC" in flags:
                ops.append(Op("truncate", full, size=0, pid=ipid))
        elif name == "write":
            path = _fd_path(a[0])
            if path is None:
                continue
            data = _string(a[1])[:ret]
            pos = positions.get((pid, path), 0)
            ops.append(Op("write", path, data=data, offset=pos, pid=ipid))
            positions[(pid, path)] = pos + len(data)
        elif name == "pwrite64":
            path = _fd_path(a[0])
            if path is not None:
                ops.append(Op("write", path, data=_string(a[1])[:ret], offset=int(a[3]), pid=ipid))
        elif name in ("writev", "pwritev", "pwritev2"):
            raise ValueError(f"{name} is not modelled: {line[:200]}")
        elif name == "lseek":
            path = _fd_path(a[0])
            if path is not None:
                positions[(pid, path)] = ret
        elif name in ("ftruncate", "truncate"):
            path = _fd_path(a[0]) if name == "ftruncate" else _abs(None, _string(a[0]), cwd)
            if path is not None:
                ops.append(Op("truncate", path, size=int(a[1]), pid=ipid))
        elif name in ("rename", "renameat", "renameat2", "link", "linkat"):
            if name in ("rename", "link"):
                old, new = _abs(None, _string(a[0]), cwd), _abs(None, _string(a[1]), cwd)
            else:
                old = _abs(_fd_path(a[0].replace("AT_FDCWD", "-100")), _string(a[1]), cwd)
                new = _abs(_fd_path(a[2].replace("AT_FDCWD", "-100")), _string(a[3]), cwd)
            ops.append(Op("rename" if name.startswith("rename") else "link", old, dest=new, pid=ipid))
        elif name in ("unlink", "unlinkat", "rmdir"):
            if name == "unlinkat":
                path = _abs(_fd_path(a[0].replace("AT_FDCWD", "-100")), _string(a[1]), cwd)
                kind = "rmdir" if "AT_REMOVEDIR" in a[2] else "unlink"
            else:
                path, kind = _abs(None, _string(a[0]), cwd), name
            ops.append(Op(kind, path, pid=ipid))
        elif name in ("mkdir", "mkdirat"):
            if name == "mkdir":
                path = _abs(None, _string(a[0]), cwd)
            else:
                path = _abs(_fd_path(a[0].replace("AT_FDCWD", "-100")), _string(a[1]), cwd)
            ops.append(Op("mkdir", path, pid=ipid))
        elif name in ("fsync", "fdatasync"):
            path = _fd_path(a[0])
            if path is not None:
                ops.append(Op("fsync", path, pid=ipid))
        elif name in ("syncfs", "sync"):
            ops.append(Op("syncfs", pid=ipid))
    return ops


def record(cmd: Sequence[str], root: Path, *, out: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], list[Op]]:
    """Run ``cmd`` under strace; the operations on paths below ``root``."""
    trace = out / "strace.txt"
    r = subprocess.run(
        ["strace", "-f", "--seccomp-bpf", "-y", "-xx", "-s", "1048576", "-qq", "-o", str(trace),
         "-e", f"trace={TRACED}", *cmd],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )
    prefix = str(root.resolve())
    ops = [op for op in parse(trace.read_text(errors="replace"), cwd=str(cwd or os.getcwd()))
           if op.kind == "syncfs" or op.path.startswith(prefix) or op.dest.startswith(prefix)]
    return r, ops


# -- the model ----------------------------------------------------------------------------


def _parent(path: str) -> str:
    return os.path.dirname(path)


def _apply(buf: bytearray, op: Op, payload: bytes) -> None:
    if op.kind == "truncate":
        del buf[op.size:]
        return
    if len(buf) < op.offset:
        buf.extend(b"\0" * (op.offset - len(buf)))
    buf[op.offset:op.offset + len(payload)] = payload


class Model:
    """Replays ``ops`` (completion order) and builds crash states."""

    META = frozenset({"create", "rename", "link", "unlink", "mkdir", "rmdir"})

    def __init__(self, ops: Sequence[Op], *, initial: dict[str, bytes] | None = None) -> None:
        self.ops = list(ops)
        self.initial = dict(initial or {})
        # Which inode each op touches, resolved by replaying names in full.
        self._inode_of: list[int | None] = []
        self._dir_of: list[str] = []  # the directory whose entries a metadata op changes
        names: dict[str, int] = {}
        self._initial_inodes: dict[str, int] = {}
        self._n = 0
        for path in self.initial:
            names[path] = self._new()
            self._initial_inodes[path] = names[path]
        # Every content a name ever had when it was given to a complete file
        # (a rename or link onto it), from a replay with nothing lost.
        self.placed: dict[str, set[bytes]] = {p: {d} for p, d in self.initial.items()}
        full: dict[int, bytearray] = {names[p]: bytearray(d) for p, d in self.initial.items()}
        for op in self.ops:
            ino: int | None = None
            if op.kind == "create":
                if op.path not in names:
                    names[op.path] = self._new()
                ino = names[op.path]
            elif op.kind in ("write", "truncate", "fsync"):
                ino = names.get(op.path)
            elif op.kind == "rename":
                ino = names.pop(op.path, None)
                if ino is not None:
                    names[op.dest] = ino
                    self.placed.setdefault(op.dest, set()).add(bytes(full.get(ino, b"")))
            elif op.kind == "link":
                ino = names.get(op.path)
                if ino is not None:
                    names[op.dest] = ino
                    self.placed.setdefault(op.dest, set()).add(bytes(full.get(ino, b"")))
            elif op.kind == "unlink":
                ino = names.pop(op.path, None)
            if ino is not None and op.kind in ("write", "truncate"):
                _apply(full.setdefault(ino, bytearray()), op, op.data)
            self._inode_of.append(ino)
            self._dir_of.append(_parent(op.dest if op.kind in ("rename", "link") else op.path))
        self.final_names = names

    def _new(self) -> int:
        self._n += 1
        return self._n

    # -- durability -------------------------------------------------------------------
    def _barriers_before(self, k: int) -> tuple[int, dict[int, int], dict[str, int]]:
        """(index after the last barrier of any kind, per inode: index after its
        last data barrier, per directory: index after its last fsync), all <= k."""
        last_any = 0
        data: dict[int, int] = {}
        dirs: dict[str, int] = {}
        last_syncfs = 0
        for i in range(k + 1):
            op = self.ops[i]
            if op.kind == "syncfs":
                last_any = last_syncfs = i + 1
            elif op.kind == "fsync":
                last_any = i + 1
                ino = self._inode_of[i]
                if ino is not None:
                    data[ino] = i + 1
                dirs[op.path] = i + 1
        self._last_syncfs = last_syncfs
        return last_any, data, dirs

    def state(self, k: int, *, model: str, data: str, meta: str, rng: random.Random | None = None) -> dict[str, bytes]:
        """The files a power cut right after op ``k`` leaves (``k = -1``: before any).

        ``data``: unsynced writes "lost", "kept", "short" (each unsynced
        file keeps about half of its unsynced bytes) or "mixed" (each file's
        unsynced writes kept or lost at random: writeback has no order).  ``meta``: uncommitted
        metadata operations "lost", "kept", or "random" (a random prefix;
        per directory under ``strict``)."""
        rng = rng or random.Random(k)
        last_any, data_barrier, dir_barrier = self._barriers_before(k)
        last_syncfs = self._last_syncfs
        # Metadata that persists.
        kept_meta: list[int] = []
        tails: dict[str, list[int]] = {}
        for i in range(k + 1):
            op = self.ops[i]
            if op.kind not in self.META:
                continue
            if model == "ext4":
                committed = i < last_any
                group = ""
            else:
                committed = i < last_syncfs or i < dir_barrier.get(self._dir_of[i], 0)
                group = self._dir_of[i]
            if committed:
                kept_meta.append(i)
            else:
                tails.setdefault(group, []).append(i)
        for group, tail in tails.items():
            if meta == "kept":
                kept_meta += tail
            elif meta == "random":
                kept_meta += tail[:rng.randint(0, len(tail))]
        kept = set(kept_meta)
        # Replay names with the kept metadata; data per inode.
        names: dict[str, int] = dict(self._initial_inodes)
        mixed: dict[int, bool] = {}
        contents: dict[int, bytearray] = {ino: bytearray(self.initial[p]) for p, ino in self._initial_inodes.items()}
        for i in range(k + 1):
            op, ino = self.ops[i], self._inode_of[i]
            if op.kind in self.META:
                if i not in kept:
                    continue
                if op.kind == "create" and ino is not None and op.path not in names:
                    names[op.path] = ino
                elif op.kind == "rename" and ino is not None:
                    if names.get(op.path) == ino:
                        del names[op.path]
                    names[op.dest] = ino
                elif op.kind == "link" and ino is not None:
                    names[op.dest] = ino
                elif op.kind == "unlink" and names.get(op.path) == ino:
                    del names[op.path]
            elif op.kind in ("write", "truncate") and ino is not None:
                durable = i < last_syncfs or i < data_barrier.get(ino, 0)
                lost = data == "lost" or (data == "mixed" and mixed.setdefault(ino, rng.random() < 0.5))
                if not durable and lost:
                    continue
                payload = op.data
                if not durable and data == "short":
                    payload = payload[: len(payload) // 2]
                _apply(contents.setdefault(ino, bytearray()), op, payload)
        return {path: bytes(contents.get(ino, b"")) for path, ino in names.items()}

    def crash_points(self) -> list[int]:
        """Every point after a metadata operation or a barrier (and the start)."""
        return [-1] + [i for i, op in enumerate(self.ops) if op.kind in self.META or op.kind in ("fsync", "syncfs")]

    def crash_states(self, *, model: str, seed: int = 0, mixes: int = 4) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        rng = random.Random(seed)
        for k in self.crash_points():
            for data, meta in (("lost", "kept"), ("lost", "lost"), ("short", "kept"), ("kept", "lost")):
                yield k, f"data {data}, metadata {meta}", self.state(k, model=model, data=data, meta=meta)
            for _ in range(mixes):
                yield k, "data mixed, metadata random", self.state(k, model=model, data="mixed", meta="random",
                                                                   rng=rng)
