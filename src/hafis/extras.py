"""Optional dependencies: ``pip install hafis`` gives what ``hafis train`` needs on your data; pictures, TensorBoard
and the demo's data come with extras (``pyproject.toml``), and a missing one is a one-line error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from hafis.errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional dependency the command or a config key needs is not installed; the message names the extra."""


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """``module`` imported, or a :class:`MissingExtraError` naming ``pip install 'hafis[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{needed_by} needs the Python package '{module.split('.')[0]}', which is not "
                                f"installed: pip install 'hafis[{extra}]'") from None


__all__ = ["MissingExtraError", "require"]
