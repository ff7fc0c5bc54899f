"""``hafis demo``: supervised vs UniMatch vs UniMatch + the weighting, on the built-in synthetic scenes.

:mod:`~hafis.demo.run` runs the trainings, :mod:`~hafis.demo.detector` the detector step of the detector-verified
run, :mod:`~hafis.demo.report` writes ``report.md`` and the curves; ``configs/`` holds the full and quick demos.
"""

from .report import RunRecord
from .run import run_demo

__all__ = ["RunRecord", "run_demo"]
