"""Reading a torch file (checkpoint, pretrained weights) a user gave: data only, and bounded.

``torch.load(weights_only=True)`` refuses any pickle that would build arbitrary objects (and so could run code). Before
it, a file that is neither a torch archive nor a pickle is called corrupt (not mistaken for an unsafe one), and an
archive whose members expand far past the file's size (a zip bomb; torch stores them uncompressed) is refused; after
it, containers nested deeper than :data:`MAX_DEPTH` or holding more than :data:`MAX_ITEMS` values (a few shared dicts
can stand for billions) are refused before anything else walks them.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from hafis.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be read (truncated, corrupt, or not a hafis checkpoint) or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A file that needs arbitrary pickled objects: refused, and never skipped in favour of an older checkpoint."""


#: containers nested deeper than this are refused (a hafis checkpoint is about 6 levels deep, a state dict 1)
MAX_DEPTH = 32
#: values held by all containers of a checkpoint, counted with shared containers repeated
MAX_ITEMS = 2_000_000
#: an archive's members may expand to this multiple of the file's size (+ 1 MB); torch stores them uncompressed
MAX_EXPANSION = 2
#: opcodes of a raw pickle read (never run) to name what it would import
MAX_SCANNED_OPCODES = 1_000_000
#: what every refusal of an unsafe file advises
NEVER_UNSAFE = ("refused: loading it could run code; never load a file you did not write yourself with "
                "torch.load(weights_only=False) or pickle, and hafis never needs that")


def _check_file(path: Path, what: str) -> None:
    """Refuse what is no torch file (so a corrupt one is not mistaken for an unsafe pickle) and zip bombs."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                total = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{what} {path} is unreadable (truncated or corrupt): {exc}") from None
        size = path.stat().st_size
        if total > MAX_EXPANSION * size + (1 << 20):
            raise CheckpointError(f"{what} {path} expands to {total} bytes from {size} on disk; refused (a "
                                  f"torch checkpoint is stored uncompressed)")
    elif not head.startswith(b"\x80"):  # a legacy torch file is a pickle, which starts with its protocol
        raise CheckpointError(f"{what} {path} is unreadable (truncated or corrupt): neither a torch archive "
                              f"nor a pickle")


def _check_nesting(state: Any, path: Path, what: str) -> None:
    """Walk the containers iteratively (shared ones as often as they occur) within :data:`MAX_DEPTH` levels and
    :data:`MAX_ITEMS` values."""
    stack, count = [(state, 0)], 0
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple, set)):
            children = list(value)
        else:
            continue
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"{what} {path} nests containers deeper than {MAX_DEPTH} levels; refused")
        count += len(children)
        if count > MAX_ITEMS:
            raise CheckpointError(f"{what} {path} holds more than {MAX_ITEMS} values; refused")
        stack.extend((child, depth + 1) for child in children)


def _pickle_import(path: Path) -> str:
    """The first ``module.name`` a raw pickle would import (read opcode by opcode, never run), or ``""``."""
    strings: list[str] = []
    try:
        with open(path, "rb") as fh:
            for count, (op, arg, _) in enumerate(pickletools.genops(fh)):
                if count > MAX_SCANNED_OPCODES:
                    break
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    return arg.replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
    except (ValueError, EOFError, OSError, pickle.UnpicklingError):
        pass
    return ""


def _refusal(path: Path, what: str, message: str) -> CheckpointError:
    """The error of a file that torch's weights-only loader refused, in hafis's words (torch's own message advises
    to retry unsafely)."""
    named = re.search(r"GLOBAL ([\w.]+)", message)
    imported = named.group(1) if named else _pickle_import(path)
    if imported:
        return UnsafeCheckpointError(f"{what} {path} needs arbitrary pickled objects (it imports {imported}); "
                                     f"{NEVER_UNSAFE}")
    lines = [line.strip().rstrip(".") for line in message.splitlines()]
    unsupported = next((re.sub(r".*error: ", "", line) for line in lines if "Unsupported" in line), "")
    return UnsafeCheckpointError(f"{what} {path} is a pickle that torch's safe loader cannot read "
                                 f"({unsupported or 'not tensors and plain containers'}); {NEVER_UNSAFE}")


def read_torch_file(path: Path, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """The content of the torch file ``path`` (``what`` names it in messages), read within the bounds above;
    raises :class:`CheckpointError` (:class:`UnsafeCheckpointError` for arbitrary pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        _check_file(path, what)
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol its safe loader may not read
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(f"{what} {path} is unreadable (truncated or corrupt): {exc}") from None
        raise _refusal(path, what, str(exc)) from None
    except Exception as exc:  # torch raises several types for truncated zip archives
        raise CheckpointError(f"{what} {path} is unreadable (truncated or corrupt): {exc}") from None
    _check_nesting(state, path, what)
    return state


__all__ = ["MAX_DEPTH", "MAX_EXPANSION", "MAX_ITEMS", "CheckpointError", "UnsafeCheckpointError", "read_torch_file"]
