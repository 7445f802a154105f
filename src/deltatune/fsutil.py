"""Writing outputs safely: one atomic-directory writer, one "never overwrite an input" rule, file
modes that follow the umask, and JSON that strict parsers accept.

``atomic_dir(final)`` yields a temporary directory next to ``final`` (same file system, so the
rename is atomic); when the block ends it fsyncs every file and directory in it, renames it into
place (an existing output is moved aside first and deleted after), and fsyncs the parent, so a
crash or a full disk leaves either the old output or the new one — never half of one. On an
error the temporary directory is removed and the error names ``final``.

Modes: ``mkstemp``/``mkdtemp`` create 0600/0700 whatever the umask; a teammate or a server under
another uid could then not read an adapter. Every temp file and directory made here gets the
mode an ordinary ``open()``/``mkdir()`` would (0666/0777 minus the umask) before it is renamed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "check_output", "fix_modes", "merge_into_dir", "refuse_input", "default_mode", "fsync_tree", "dumps_json", "json_safe",
           "OutputExistsError"]


class OutputExistsError(FileExistsError):
    """The output path holds something this command must not replace."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is set-and-return, racy with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_mode(directory: bool = False) -> int:
    """The mode ``open(..., 'w')`` (0666) or ``mkdir`` (0777) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first), under ``root``."""
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs.extend(Path(dirpath) / d for d in dirnames)
    for d in reversed(dirs):
        _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fix_modes(root: Path) -> None:
    """Give temp-made files/dirs (0600/0700) the umask's modes; keep execute bits of files."""
    dmode, fmode = default_mode(True), default_mode(False)
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            mode = os.stat(p).st_mode & 0o777
            if mode in (0o600, 0o700):  # mkstemp's owner-only mode (0700: an executable written so)
                os.chmod(p, dmode if mode == 0o700 else fmode)


def _io_error(final: Path, e: BaseException) -> OSError:
    """OSError(errno, reason, final): the CLI prints '<final>: <reason>'."""
    errno = getattr(e, "errno", None)
    reason = getattr(e, "strerror", None) or str(e)
    inner = getattr(e, "filename", None)
    where = f" while writing {inner}" if inner else ""
    return OSError(errno or 5, f"writing failed: {reason}{where}; nothing was replaced", str(final))


def _is_io_failure(e: BaseException) -> bool:
    # safetensors' Rust writer raises SafetensorError (not OSError) when the disk is full.
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and
                                      any(w in str(e) for w in ("File too large", "No space", "os error")))


def check_output(final: str | os.PathLike[str], *, replaceable: Callable[[Path], bool] | None = None,
                 what: str = "output") -> None:
    """:func:`atomic_dir`'s refusal rules alone, to run before a slow load; writes nothing."""
    final = Path(final)
    if final.is_symlink() or final.is_file():
        raise OutputExistsError(f"{final}: exists and is a file; the {what} is a directory: choose another path")
    if final.is_dir() and any(final.iterdir()) and not (replaceable is not None and replaceable(final)):
        raise OutputExistsError(f"{final}: exists and holds other files; the {what} would replace them: "
                                "choose a new or empty directory")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, replaceable: Callable[[Path], bool] | None = None,
               what: str = "output") -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to ``final`` when the block succeeds.

    An existing ``final`` is replaced only when it is empty or ``replaceable(final)`` says it is
    an earlier output of the same kind (a model directory, an adapter directory); a file, or a
    directory holding anything else, is refused before anything is written."""
    final = Path(final)
    check_output(final, replaceable=replaceable, what=what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fix_modes(tmp)
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / "old")
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_io_failure(e) and getattr(e, "filename", None) != str(final):
            raise _io_error(final, e) from e
        raise


def merge_into_dir(src: Path, dst: Path) -> None:
    """Move every file of the (complete, fsynced) directory ``src`` into ``dst``, one atomic rename
    each, then remove ``src``: for outputs written into a directory that also holds other files."""
    for f in sorted(src.iterdir()):
        target = dst / f.name
        if f.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    _fsync_dir(dst)
    shutil.rmtree(src, ignore_errors=True)


def _resolved(p: str | os.PathLike[str]) -> Path:
    return Path(p).expanduser().resolve()


def refuse_input(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
                 flag: str = "--out") -> None:
    """The one "this path is an input" rule: refuse an output that is, contains or lies inside an
    input (``inputs`` = (what, path) pairs, e.g. ("base model", model_dir)). Checked before any
    write, so the base weights or the adapter being merged can never be overwritten."""
    o = _resolved(out)
    for what, path in inputs:
        if path is None or not Path(path).exists():
            continue
        i = _resolved(path)
        if o == i or i.is_relative_to(o) or (i.is_dir() and o.is_relative_to(i)):
            raise OutputExistsError(f"{flag} {out}: that is (or holds) the {what} {path}, an input of this "
                                    "command; refusing to overwrite an input: choose another path")


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/±inf floats replaced by None, recursively (strict JSON has no NaN token)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that never writes bare NaN/Infinity: non-finite floats become null."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)
