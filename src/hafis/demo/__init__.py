"""``hafis demo``: supervised vs UniMatch vs UniMatch + the weighting, one seed: a ``hafis compare`` with fixed arms.

:mod:`~hafis.demo.run` plans and runs the comparison and draws the pictures, :mod:`~hafis.demo.detector` the
detector step of the detector-verified run, :mod:`~hafis.demo.report` the demo's sections of ``report.md``;
``configs/`` holds the full and quick demos.
"""

from .report import RunRecord
from .run import run_demo

__all__ = ["RunRecord", "run_demo"]
