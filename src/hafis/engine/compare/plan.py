"""The plan of a comparison: arms (a name and overrides) x seeds, each a validated config and a run folder; arms
whose detector is the same (:func:`hafis.detection.identity.detector_identity`) share one detector folder."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hafis.config import Config, ConfigError, load_config
from hafis.detection.identity import detector_key
from hafis.fields import MAX_SEED, number_error

_DEFAULT_DETECTOR_DIR = "runs/{name}/detector"
#: the arms, seeds and overrides of a comparison, so ``--report-only`` needs nothing but ``--out``
PLAN_FILE = "compare.json"


def slug(name: str) -> str:
    """An arm's folder name: its name with anything but letters, digits and ``._+-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


@dataclass
class Arm:
    name: str
    overrides: list[str]

    @property
    def slug(self) -> str:
        """The arm's folder name (:func:`slug`)."""
        return slug(self.name)


def parse_arm(text: str) -> Arm:
    """``"NAME: key=value key=value"`` (values may be quoted as in a shell)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--arm {text!r} must be 'NAME: key=value ...' (a name, a colon, then overrides)")
    try:
        overrides = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"--arm {text!r}: {exc}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"--arm {name!r}: {bad[0]!r} is not of the form key=value")
    return Arm(name, overrides)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers such as 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must name at least one seed, each once")
    problem = next((number_error(s, 0, MAX_SEED) for s in seeds if number_error(s, 0, MAX_SEED)), None)
    if problem:
        raise ConfigError(f"--seeds: each seed {problem}")
    return seeds


@dataclass
class RunSpec:
    """One arm x seed: its config (validated) and the command lines that train it."""

    arm: Arm
    seed: int
    config: Config
    run_dir: Path
    overrides: list[str]
    #: the shared detector folder when the arm needs ``hafis detect`` first, else None
    detector_dir: Optional[Path] = None

    @property
    def label(self) -> str:
        return f"{self.arm.name} seed {self.seed}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "compare.log"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "compare_run.json"


def needs_detector(config: Config) -> bool:
    return config.weighting.enabled and config.weighting.reliable == "detector"


def plan_runs(config_path: Path, arms: Sequence[Arm], seeds: Sequence[int], common: Sequence[str],
              out: Path) -> list[RunSpec]:
    """Every arm x seed, seed-major (all arms of the first seed first, so paired results come early). Every config
    is loaded here, so a bad key in any arm stops before anything runs."""
    if not arms:
        raise ConfigError("give at least one --arm 'NAME: key=value ...'")
    slugs = [a.slug for a in arms]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise ConfigError(f"--arm names must differ (as folder names): {dup[0]!r} is used twice")
    specs = []
    for seed in seeds:
        for arm in arms:
            run_dir = out / "runs" / arm.slug / f"seed_{seed}"
            overrides = [*common, *arm.overrides, f"seed={seed}", f"name={arm.slug}-seed{seed}",
                         f"output_dir={run_dir}", "train.progress_bar=false"]
            try:
                config = load_config(config_path, overrides)
            except ConfigError as exc:
                raise ConfigError(f"arm {arm.name!r}: {exc}") from None
            detector_dir = None
            if needs_detector(config):
                if config.detector.output_dir == _DEFAULT_DETECTOR_DIR:
                    detector_dir = out / "detectors" / detector_key(config)
                    overrides.append(f"detector.output_dir={detector_dir}")
                    config = load_config(config_path, overrides)
                else:
                    detector_dir = Path(config.detector.output_dir.format(name=config.name))
            specs.append(RunSpec(arm, seed, config, run_dir, overrides, detector_dir))
    return specs
