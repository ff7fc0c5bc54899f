"""Checkpoints written atomically and kept in a short rotation.

A checkpoint is first written to a temporary file in the same folder and then renamed over its final name, so a
crash mid-write never leaves a half-written file under a real name and never destroys the previous checkpoint.
Checkpoints hold only tensors and plain containers and are read with ``weights_only=True``: a file whose unpickling
would build arbitrary objects (and so could run code) is refused, never loaded; reads are bounded
(:func:`hafis.torch_files.read_torch_file`), and entries of the wrong type are named.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from hafis.config import ConfigError, config_changes
from hafis.errors import short
from hafis.files import atomic_write
from hafis.torch_files import CheckpointError, UnsafeCheckpointError, read_torch_file


def save_atomic(state: Any, path: Path) -> None:
    """``torch.save`` through :func:`hafis.files.atomic_write` (a full disk is a one-line ``WriteError``)."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def _check_entries(state: dict, path: Path) -> None:
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        raise CheckpointError(f"checkpoint {path}: 'model' must map parameter names to tensors, got "
                              f"{type(model).__name__}" + ("" if not isinstance(model, dict) else " of other values"))
    iteration = state.get("iteration", 0)
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise CheckpointError(f"checkpoint {path}: 'iteration' must be a whole number >= 0, got {short(iteration)}")
    if not isinstance(state.get("config") or {}, dict):
        raise CheckpointError(f"checkpoint {path}: 'config' must be a mapping, got {type(state['config']).__name__}")


#: what a checkpoint needs to continue training (or to rebuild a trainer's state), with each one's type
TRAINING_STATE = {"student": dict, "optimizer": dict, "framework": dict, "iteration": int, "best_miou": (int, float),
                  "torch_rng": torch.Tensor}


def require_training_state(state: dict, path: Any) -> None:
    """Raise unless ``state`` holds a whole training state (a model-only checkpoint can be evaluated, no more)."""
    for key, kind in TRAINING_STATE.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path} holds no training state (no {key!r} entry); only a checkpoint "
                                  f"written by hafis train (checkpoints/ckpt_*.pt) can be resumed or visualized")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"checkpoint {path}: {key!r} has the wrong type ({type(state[key]).__name__})")


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    path = Path(path)
    state = read_torch_file(path, map_location)
    if isinstance(state, dict) and "model" not in state:
        # a U2PL / AEL / AugSeg release's file: the teacher is the model they evaluate (AEL saves it as model_state)
        released = state.get("teacher_state", state.get("model_state"))
        if isinstance(released, dict):
            state = {"model": released}
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a hafis checkpoint (no 'model' entry)")
    _check_entries(state, path)
    return state


class CheckpointManager:
    """``ckpt_<iteration>.pt`` files in ``directory``, the newest ``keep`` of them kept."""

    pattern = re.compile(r"ckpt_(\d+)\.pt$")

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def path_for(self, iteration: int) -> Path:
        return self.directory / f"ckpt_{iteration:08d}.pt"

    def list(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, iteration: int) -> Path:
        path = self.path_for(iteration)
        save_atomic(state, path)
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: Any = "cpu") -> Optional[tuple[Path, dict]]:
        """The newest readable checkpoint; an unreadable newer one is reported and skipped, never deleted."""
        for path in reversed(self.list()):
            try:
                return path, load_checkpoint(path, map_location)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as exc:
                warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
        return None


def load_module_state(module: torch.nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)``, but a mismatch is a :class:`CheckpointError` naming the first differing
    keys and shapes (a checkpoint of another model config, e.g. another ``model.feature_dim``)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and torch.is_tensor(state[k]) and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("shapes differ", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {'; '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model of this config: {'; '.join(problems)}")
    module.load_state_dict(state)


def _content(digest: Optional[str]) -> str:
    return f"file content {digest[:12]}" if isinstance(digest, str) else "<absent>"


def _allowed(key: str, allow_change: tuple) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow_change)


def experiment_changes(state: dict, config: Any, digests: dict, allow_change: tuple, path: Any,
                       precision: Optional[tuple[str, str]] = None) -> dict:
    """The keys that changed the experiment between checkpoint ``state`` and ``config`` (a key not declared
    ``runtime``, or a split file's content, ``digests``, or the resolved ``precision`` ``(amp, why)`` against the
    one the checkpoint trained in), old -> new; a :class:`ConfigError` listing them unless each is named in
    ``allow_change`` (a key or a whole section)."""
    changes = config_changes(state.get("config"), config)
    old_digests = state.get("split_digests")
    if isinstance(old_digests, dict):  # a checkpoint from before split hashes has none to compare
        for key in sorted(set(old_digests) | set(digests)):
            if key not in changes and old_digests.get(key) != digests.get(key):
                changes[key] = (_content(old_digests.get(key)), _content(digests.get(key)))
    trained_in = state.get("amp")  # train.amp resolved where the checkpoint was written (auto: per machine)
    if precision is not None and "train.amp" not in changes and isinstance(trained_in, str) \
            and trained_in != precision[0]:
        old_train = state.get("config", {}).get("train") if isinstance(state.get("config"), dict) else None
        old_amp = old_train.get("amp", "?") if isinstance(old_train, dict) else "?"
        changes["train.amp"] = (f"{str(old_amp)[:20]} ({trained_in[:20]})", f"{config.train.amp} ({precision[0]}: "
                                f"{precision[1].removeprefix('train.amp=auto: ')})")
    refused = {k: v for k, v in changes.items() if not _allowed(k, allow_change)}
    if refused:
        listed = "; ".join(f"{k}: {short(old)} -> {short(new)}" for k, (old, new) in refused.items())
        raise ConfigError(f"cannot resume from {path}: the config changed the experiment ({listed}); start a "
                          f"new run (another name or output_dir), or accept with --allow-change KEY")
    return changes
