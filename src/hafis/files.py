"""How hafis writes files: atomically, in strict JSON, with a full disk named as such.

Every file hafis writes whole (checkpoints, caches, split lists, reports, ``results.json``) goes through
:func:`atomic_write`: a temporary file with a unique name beside the target, flushed to disk, then renamed over it,
so a crash, a kill or a full disk never leaves a half-written file under a real name nor destroys the previous
version, and a failed write leaves no temporary file behind. Append-only logs (``metrics.jsonl``) use
:func:`append_line`, which writes a line whole or not at all. A failed write is a :class:`WriteError` naming the file
and the cause ("no space left on device"), one line for the user. JSON is strict (:func:`json_dumps`): a NaN is
written as ``null`` and an infinity as the string ``"inf"`` / ``"-inf"``, never as the bare ``NaN`` that JSON
readers refuse.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Union

from hafis.errors import UserError

#: suffix of the temporary files of :func:`atomic_write` (``.<name>.<random>.tmp`` beside the target)
TMP_SUFFIX = ".tmp"

Content = Union[bytes, str, Callable[[Any], None]]


class WriteError(UserError, OSError):
    """A file could not be written (no space left on device, no permission, a read-only folder); nothing that was
    there before is lost."""

    @classmethod
    def of(cls, path: os.PathLike | str, exc: OSError) -> "WriteError":
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        err = cls(f"cannot write {path}: {reason}")
        err.errno = exc.errno
        return err


class _Sink:
    """The file a writer callback gets: it remembers an ``OSError`` of the disk, which a C++ writer (``torch.save``)
    would otherwise turn into an unrelated message."""

    def __init__(self, fh) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._fh.flush()

    def __getattr__(self, name: str) -> Any:  # tell, seek, fileno ... of the real file
        return getattr(self._fh, name)


def _open_fd(fd: int):
    """The file object over a new temporary file's descriptor (tests replace it with a disk that fills up)."""
    return os.fdopen(fd, "wb")


def temporary_name(path: Path) -> Path:
    """A new unique temporary name beside ``path``: ``.<name>.<random hex>.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temporary(path: Path, target_pattern: str = "") -> bool:
    """Whether ``path`` is a temporary file left by :func:`atomic_write` (of a target starting with
    ``target_pattern``)."""
    name = path.name
    return name.startswith("." + target_pattern) and (name.endswith(TMP_SUFFIX) or ".tmp-" in name)


def atomic_write(path: os.PathLike | str, content: Content, fsync: bool = True) -> None:
    """Write ``content`` (bytes, text as UTF-8, or a callback ``write(file)``) to ``path`` atomically.

    The temporary file gets a unique name in the target's folder (so concurrent writers never share one and the
    rename never crosses file systems), is flushed and ``fsync``-ed, then renamed over ``path``. On any failure the
    temporary file is removed and ``path`` keeps its previous content; a disk error is a :class:`WriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise WriteError.of(path, exc) from None
    sink = None
    try:
        with _open_fd(fd) as fh:
            sink = _Sink(fh)
            if callable(content):
                content(sink)
            else:
                sink.write(content.encode() if isinstance(content, str) else content)
            sink.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = sink.error if sink is not None and sink.error is not None else exc
        if isinstance(cause, OSError) and not isinstance(cause, UserError):
            raise WriteError.of(path, cause) from None
        raise


def check_output(path: os.PathLike | str, kind: str, what: str, example: str = "") -> Path:
    """Refuse, before any work, an output path that cannot be written (a :class:`WriteError` naming ``what``, the
    option or key): a folder (``kind`` ``"folder"``) that exists as a file, a file (``"file"``) that exists as a
    folder, a path under a regular file, or a place this process may not write in. Creates nothing; returns
    ``Path(path)``. ``example`` is a file name to suggest for a file given as a folder."""
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise WriteError(f"{what} {path} is a file, not a folder")
    if kind == "file" and path.is_dir():
        hint = f" (e.g. {path / example})" if example else ""
        raise WriteError(f"{what} {path} is a folder; give the path of the file to write{hint}")
    existing = path.absolute() if kind == "folder" else path.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WriteError(f"{what} {path} cannot be written: no permission to write in {existing}")
    return path


def _write(fd: int, data: bytes) -> int:
    return os.write(fd, data)


def append_line(path: os.PathLike | str, line: str) -> None:
    """Append ``line`` and a newline to ``path`` whole or not at all: on a failed or short write the file is cut
    back to its previous length, so a full disk never leaves a torn line."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError.of(path, exc) from None
    try:
        size = os.fstat(fd).st_size
        try:
            written = _write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise WriteError.of(path, exc) from None
    finally:
        os.close(fd)


def finite(value: Any) -> Any:
    """``value`` with every NaN float replaced by ``None`` and every infinity by ``"inf"`` / ``"-inf"``
    (containers are copied; numpy and torch scalars become Python numbers)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if not isinstance(value, (int, float, str, bool)) and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def json_dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always gives strict JSON (:func:`finite`); other unknown objects become strings."""
    kwargs.setdefault("default", str)
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_json(path: os.PathLike | str, value: Any, **kwargs: Any) -> None:
    """:func:`json_dumps` + newline, written with :func:`atomic_write`."""
    atomic_write(path, json_dumps(value, **kwargs) + "\n")


__all__ = ["TMP_SUFFIX", "WriteError", "append_line", "atomic_write", "check_output", "finite", "is_temporary",
           "json_dumps", "temporary_name", "write_json"]
