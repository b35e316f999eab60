"""Running the ``rsync`` binary (Debian package ``rsync``) for ``mirror pull``.

Every run asks rsync to itemize what it did (``--out-format='%i %n'``) and for
``--stats``, so the caller learns exactly which files arrived or went.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mirror.errors import PullError

log = logging.getLogger(__name__)

# rsync(1) EXIT VALUES that an operator should see spelled out.
_EXIT = {
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files or directories",
    5: "error starting the client-server protocol",
    10: "error in socket I/O",
    11: "error in file I/O",
    12: "error in the rsync protocol data stream",
    23: "partial transfer due to error",
    24: "partial transfer: source files vanished",
    30: "timeout in data send/receive",
    35: "timeout waiting for the daemon connection",
}
VANISHED = 24
# Pages are rewritten in place, often within the same second and at the same
# size: compare mtimes to the nanosecond, not rsync's default whole second.
EXACT_TIMES = "--modify-window=-1"
_ITEM = re.compile(r"^([<>ch.][fdLDS][^ ]*) (.+)$")


@dataclass
class Result:
    received: list[str] = field(default_factory=list)  # regular files that arrived
    deleted: list[str] = field(default_factory=list)
    stats: dict[str, str] = field(default_factory=dict)

    @property
    def files_transferred(self) -> int:
        """rsync's own count ("Number of regular files transferred")."""
        return int(self.stats.get("Number of regular files transferred", "0").replace(",", ""))


def parse_output(text: str) -> Result:
    res = Result()
    for line in text.splitlines():
        if line.startswith("*deleting"):
            res.deleted.append(line[len("*deleting"):].strip())
        elif m := _ITEM.match(line):
            if m.group(1)[1] == "f" and m.group(1)[0] in "<>c":
                res.received.append(m.group(2))
        elif ": " in line and (line.startswith("Number of") or line.startswith("Total")):
            key, _, value = line.partition(": ")
            res.stats[key.strip()] = value.strip()
    return res


def is_daemon_source(source: str) -> bool:
    return source.startswith("rsync://") or "::" in source


class Rsync:
    def __init__(self, binary: str = "rsync", *, timeout: int = 600, extra: Sequence[str] = ()) -> None:
        self.binary = binary
        self.timeout = timeout
        self.extra = list(extra)
        self._fsync: bool | None = None

    async def can_fsync(self) -> bool:
        """Whether this rsync has ``--fsync`` (3.2.4 and later), asked once."""
        if self._fsync is None:
            try:
                proc = await trio.run_process([self.binary, "--help"], capture_stdout=True, capture_stderr=True,
                                              check=False)
                self._fsync = b"--fsync" in proc.stdout
            except OSError:
                # Not runnable: the transfer itself reports that clearly.
                self._fsync = False
                return False
            if not self._fsync:
                log.warning("%s has no --fsync (rsync >= 3.2.4): received files reach the disk only with "
                            "the syncfs that mirror pull runs before it publishes pages", self.binary)
        return self._fsync

    async def run(self, args: Sequence[str], *, what: str, source: str = "", ok: Iterable[int] = (0,)) -> Result:
        cmd = [self.binary, "--out-format=%i %n", "--stats", f"--timeout={self.timeout}"]
        if is_daemon_source(source):
            cmd.append("--contimeout=60")
        cmd += [*self.extra, *args]
        log.debug("running %s", " ".join(cmd))
        try:
            proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        except FileNotFoundError:
            raise PullError(f"{self.binary}: not found; install rsync (Debian package `rsync`)") from None
        if proc.returncode not in tuple(ok):
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = "; ".join(err[-3:]) or "no message"
            meaning = _EXIT.get(proc.returncode, "error")
            raise PullError(f"{what}: rsync exited {proc.returncode} ({meaning}): {detail}")
        if proc.returncode == VANISHED:
            log.info("%s: some source files vanished during the transfer (retired upstream)", what)
        return parse_output(proc.stdout.decode("utf-8", "replace"))

    async def fetch_list(
        self, source: str, paths: Sequence[str], target: Path, *, listfile: Path, temp_dir: Path,
        what: str, compare_dest: Path | None = None, ignore_missing: bool = True, always: bool = False,
    ) -> Result:
        """Copy ``paths`` (relative to ``source``) into ``target`` with ``--files-from``;
        ``always`` skips rsync's quick check (size and mtime) and sends every one."""
        if not paths:
            return Result()
        await trio.Path(listfile).write_text("".join(p + "\n" for p in paths))
        args = ["-t", EXACT_TIMES, f"--files-from={listfile}", f"--temp-dir={temp_dir}"]
        if await self.can_fsync():
            # Each file reaches the disk before rsync renames it into place,
            # so a page published after it never links an empty file after a
            # power cut.
            args.append("--fsync")
        if always:
            args.append("--ignore-times")
        if ignore_missing:
            args.append("--ignore-missing-args")
        if compare_dest is not None:
            args.append(f"--compare-dest={compare_dest}/")
        args += [source, f"{target}/"]
        return await self.run(args, what=what, source=source, ok=(0, VANISHED) if ignore_missing else (0,))
