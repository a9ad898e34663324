"""An exclusive lock on a run directory for every writer of the run.

Why: two processes writing one run (a live training and a second
``train ... resume=latest``) both exited 0, ``inspect`` called the log clean,
and only a later replay failed. Every writer (training, which also applies
online deletion requests) holds this lock for as long as it writes; a second
writer gets a one-line refusal naming the holder's PID.

How: ``flock(LOCK_EX | LOCK_NB)`` on the *directory itself* (opened
read-only). The kernel drops the lock when the holder dies, even on
``kill -9``, so there is no stale lock file to clean up, and taking or being
refused the lock writes nothing into the run (a received run's bytes stay
unchanged). The holder's PID comes from ``/proc/locks`` (Linux); elsewhere
the message says "another process". Readers (``unlearn``, ``inspect``) take
no lock: they check that checkpoints and log belong together instead
(checkpoint hashes recorded in the log).
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writers are not serialised there
    fcntl = None


class RunLockError(ValueError):
    """Another process is writing this run (one line, with its PID)."""


def holder_pid(path: str | os.PathLike) -> int | None:
    """PID holding a flock on ``path`` according to ``/proc/locks``, if any."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    want_ino = str(st.st_ino)
    want_dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    by_inode = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or parts[1] != "FLOCK":
            continue
        dev_ino = parts[5].rsplit(":", 1)
        if len(dev_ino) != 2 or dev_ino[1] != want_ino or not parts[4].isdigit():
            continue
        if dev_ino[0] == want_dev:
            return int(parts[4])
        by_inode.append(int(parts[4]))
    return by_inode[0] if len(by_inode) == 1 else None  # overlay file systems report another device


class RunLock:
    """``with RunLock(run_dir): ...`` or ``lock = RunLock(d).acquire(); ...; lock.release()``."""

    def __init__(self, path: str | os.PathLike, key: str = "training.output_dir"):
        self.path = Path(path)
        self.key = key
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder_pid(self.path)
            who = ("this process" if pid == os.getpid() else f"process {pid}") if pid else "another process"
            raise RunLockError(f"{self.path} is being written by {who} (exclusive run lock): wait for it to finish "
                               f"or stop it, or choose another {self.key}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def __del__(self) -> None:
        self.release()


def lock_dirs(paths: list[Path], keys: list[str]) -> list[RunLock]:
    """Lock several directories (created if needed, each once), all or none."""
    locks: list[RunLock] = []
    seen: set[Path] = set()
    try:
        for p, key in zip(paths, keys):
            p.mkdir(parents=True, exist_ok=True)
            real = p.resolve()
            if real in seen:
                continue
            seen.add(real)
            locks.append(RunLock(p, key).acquire())
    except BaseException:
        for lk in locks:
            lk.release()
        raise
    return locks
