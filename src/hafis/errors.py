"""The one type of a user's error, and a bounded ``repr`` for the values its messages quote.

Everything hafis reads from a user's file or argument (a config, an override, a split file, a class list, a dataset
JSON, an image, a checkpoint, a run folder) fails with a :class:`UserError` (or a subclass: ``ConfigError``,
``CheckpointError``, ``DataError``) whose message names the file or key and what is wrong. The command line turns
exactly these into one line and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib
from typing import Any

#: quotes of a user's value: a few items of a list, a few levels of nesting, a short string; a YAML alias bomb or a
#: 400-digit number is never expanded in full
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 4, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 80, 40, 80


#: the longest quote of a value in a message
SHORT = 100


def short(value: Any) -> str:
    """``repr(value)`` in at most :data:`SHORT` characters, without ever building the full ``repr``."""
    text = _REPR.repr(value)
    return text if len(text) <= SHORT else text[:SHORT - 3] + "..."


#: the first line of the message torch's DataLoader gives an exception re-raised from a worker process
_WORKER_PREFIX = "Caught "


class UserError(Exception):
    """A user's file or argument cannot be used; the message names it and says what is wrong (one line).

    Raised in a data-loader worker, the exception reaches the main process rebuilt from a message holding the
    worker's whole traceback; the constructor keeps only the worker's own message, so the user still reads one line.
    """

    def __init__(self, message: str = "", *args: Any) -> None:
        if isinstance(message, str) and message.startswith(_WORKER_PREFIX) and "Traceback" in message:
            message = _worker_message(message, type(self)) + " (in a data-loader worker)"
        super().__init__(message, *args)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a data-loader worker's traceback reduced to the worker's own message)."""
    text = str(exc)
    if text.startswith(_WORKER_PREFIX) and "Traceback" in text:
        text = _worker_message(text, type(exc)) + " (in a data-loader worker)"
    return " ".join(text.split()) or type(exc).__name__


def _worker_message(text: str, cls: type) -> str:
    """The original message in torch's ``Caught X in DataLoader worker process N. Original Traceback ...`` text:
    what follows the last ``module.X: `` (or ``X: ``) of the traceback."""
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = text.rfind(name)
        if at >= 0:
            return " ".join(text[at + len(name):].split())
    return " ".join(text.strip().splitlines()[-1].split())


__all__ = ["UserError", "one_line", "short"]
