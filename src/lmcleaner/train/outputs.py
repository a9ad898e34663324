"""Output directories that never destroy what a command did not create.

Why one module: ``train`` (final/best model), ``unlearn``, ``retrain``,
``eval`` and ``demo`` all write a result directory next to, or inside, a run
that may be someone else's. The rules they share:

- **Output over the source is refused** (:func:`check_output`): an output
  that *is* a source directory, lies inside one (except a fresh name the
  command itself chose, e.g. ``<run>/unlearned-<method>``), contains one, or
  already exists (unless the user passed ``overwrite``; even then never a
  source). One line, naming the path and the fix.
- **Atomic results** (:class:`AtomicDir`): the result is written to a
  temporary ``<name>.tmp-<pid>`` directory, reserved *before* any computation
  (so a read-only or missing output fails in a second, not after an hour),
  and renamed into place at the end. A kill leaves either the old result or
  the new one, plus a temp directory that the next command removes once its
  PID is dead. Temp directories are created outside the source run.
- **OS errors as one line** (:func:`describe_os_error`): disk full, read-only
  file system, permission denied, each with the path and what to do.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

TMP_PATTERN = re.compile(r"^(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
MARKER = ".lmcleaner-partial"  # inside every temp dir this module creates: only those are ever cleaned up


class OutputError(ValueError):
    """A one-line refusal to write an output (over the source, existing, not writable)."""


def describe_os_error(err: OSError, action: str = "writing") -> str:
    """One line naming the path and the fix for an operating-system error."""
    if err.errno is None:  # raised by our own code with a full message (e.g. FileExistsError("... choose ..."))
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    where = err.filename or "?"
    if err.errno == errno.ENOSPC:
        return (f"no space left on device {action} {where}: free some space (or choose an output on another disk) "
                "and rerun; nothing half-written was kept (a training run resumes with "
                "training.resume_from_checkpoint=latest)")
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded {action} {where}: free some space or choose another output directory"
    if err.errno == errno.EROFS:
        return f"read-only file system {action} {where}: choose a writable output directory"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied {action} {where}: choose a directory you can write to"
    if err.errno == errno.ENOENT:
        return f"{where}: no such file or directory"
    return f"{err.strerror or type(err).__name__} {action} {where}"


def with_filename(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` naming ``path`` (a failed ``write()`` reports no file name)."""
    if err.filename is None:
        new = type(err)(err.errno, err.strerror or str(err), str(path))
        return new
    return err


def as_os_error(err: BaseException, path: str | os.PathLike) -> OSError | None:
    """The ``OSError`` (naming ``path``) behind ``err``, if it is one: safetensors and
    ``save_pretrained`` report a full disk as ``SafetensorError("... (os error 28)")``."""
    if isinstance(err, OSError):
        return with_filename(err, path)
    m = re.search(r"os error (\d+)", str(err))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` whose I/O failures are ``OSError`` naming the file."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as err:
        os_err = as_os_error(err, path)
        if os_err is None:
            raise
        raise os_err from None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_within(path: Path, root: Path) -> bool:
    """``path`` equals ``root`` or lies below it (both resolved)."""
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def check_output(out: str | os.PathLike, sources: Iterable[str | os.PathLike | None], *, overwrite: bool = False,
                 key: str = "output_dir", overwrite_key: str | None = None,
                 allowed_inside: Callable[[Path, Path], bool] | None = None) -> Path:
    """Refuse an output that would write over a source; returns the resolved output path.

    ``allowed_inside(out, source)``: the one place inside a source a command may
    write (its default result location, e.g. a direct child ``unlearned-*``).
    """
    target = resolved(out)
    clean_stale(target.parent, only=lambda base: base == target.name)  # put back a result a kill left aside
    fix_overwrite = f" or set {overwrite_key}=true" if overwrite_key else ""
    for src in sources:
        if src is None:
            continue
        s = resolved(src)
        if target == s:
            raise OutputError(f"{key}={out} is the source run {s}: writing there would destroy it; "
                              f"choose a new directory")
        if is_within(s, target):
            raise OutputError(f"{key}={out} contains the source {s}: writing there could destroy it; "
                              "choose a new directory outside it")
        if is_within(target, s) and not (allowed_inside and allowed_inside(target, s)):
            raise OutputError(f"{key}={out} is inside the source run {s}: choose a directory outside it "
                              "(the default location is a fresh name inside the run)")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(f"{key}={out} exists and is not a directory: choose a new directory")
        if not overwrite:
            raise OutputError(f"{key}={out} already exists: choose a new directory{fix_overwrite}")
    return target


def fresh_child(parent: Path, base: str) -> Path:
    """``parent/base``, or ``base-2``, ``base-3``... : the first name not taken (a default never overwrites)."""
    cand, n = parent / base, 1
    while cand.exists() or cand.is_symlink() or _reserved(parent, cand.name):
        n += 1
        cand = parent / f"{base}-{n}"
    return cand


def _reserved(parent: Path, name: str) -> bool:
    """A live process is writing ``name`` (its temp dir exists with a live PID)."""
    if not parent.is_dir():
        return False
    for p in parent.iterdir():
        m = TMP_PATTERN.match(p.name)
        if m and m["kind"] == "tmp" and m["base"].endswith(name) and pid_alive(int(m["pid"])):
            return True
    return False


def clean_stale(parent: Path, only: Callable[[str], bool] | None = None) -> list[Path]:
    """Remove temp dirs (``*.tmp-PID``, with this module's marker) whose process is dead, and
    put back an ``X.old-PID`` whose swap was interrupted (``X`` missing). Returns what was removed."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        m = TMP_PATTERN.match(p.name)
        if not m or (only is not None and not only(m["base"])) or not p.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid) or not (p / MARKER).exists():
            continue
        if m["kind"] == "old":
            final = parent / m["base"]
            if not final.exists():
                (p / MARKER).unlink(missing_ok=True)
                os.replace(p, final)  # the swap was killed between its two renames: restore the old result
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


class AtomicDir:
    """A result directory written in a temp dir and renamed into place.

    ``reserve()`` creates ``<tmp_parent>/<prefix><name>.tmp-<pid>`` (and fails now if
    the location is not writable); write into :attr:`tmp`; ``commit()`` swaps it in
    (an existing ``final`` is replaced only when the caller allowed it, see
    :func:`check_output`); ``abort()`` removes it. Use as a context manager to abort
    on any error.
    """

    def __init__(self, final: str | os.PathLike, tmp_parent: str | os.PathLike | None = None, prefix: str = "",
                 replace: bool = True, tag: str | None = None):
        self.final = Path(final)
        self.tmp_parent = Path(tmp_parent) if tmp_parent is not None else self.final.parent
        # tag: the PID of the process that owns the temp dir when several processes write into it
        # (the main rank's: sharded checkpoints, a multi-process retrain); default: this process's
        self.tmp = self.tmp_parent / f"{prefix}{self.final.name}.tmp-{tag or os.getpid()}"
        self.replace = replace  # False: never replace a ``final`` that appeared meanwhile
        self.committed = False

    def reserve(self) -> "AtomicDir":
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.tmp_parent)
            if self.tmp_parent != self.final.parent:
                clean_stale(self.final.parent)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
            (self.tmp / MARKER).write_text(str(os.getpid()))
        except OSError as err:
            self.abort()
            raise OutputError(describe_os_error(err, "creating")) from None
        return self

    def commit(self) -> Path:
        # the marker goes only after the rename: a kill before it leaves a temp dir clean_stale() may remove
        if self.final.exists() or self.final.is_symlink():
            if not self.replace:
                raise OutputError(f"{self.final} appeared while this command ran: choose a new directory or "
                                  "allow overwriting")
            old = self.final.parent / f"{self.final.name}.old-{os.getpid()}"
            if self.final.is_dir():  # lets clean_stale() put it back if we are killed between the renames
                (self.final / MARKER).write_text(str(os.getpid()))
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(self.tmp, self.final)
        self.committed = True
        (self.final / MARKER).unlink(missing_ok=True)
        return self.final

    def abort(self) -> None:
        if not self.committed and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "AtomicDir":
        if not self.tmp.exists():
            self.reserve()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        return False


def probe_writable(path: str | os.PathLike, key: str) -> None:
    """Fail now (one line) if a file could not be created in ``path``'s directory."""
    d = Path(path)
    d = d if d.is_dir() else d.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    probe = d / f".lmcleaner-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{key}: {describe_os_error(err, 'creating')}") from None
