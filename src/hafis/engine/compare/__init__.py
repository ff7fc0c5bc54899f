"""``hafis compare``: every arm x seed of an experiment as its own ``hafis train`` process, then one report.

Identical runs of an SSL recipe differ by 0.3-1.4 mIoU, so one run per method hides small effects. The runner trains
each arm (a set of overrides) with each seed, ``--jobs N`` at a time with the CPU threads split between them, and
writes ``DIR/results.json`` and ``DIR/report.md`` (mean ± std per arm, the paired difference to a baseline arm with a
95 % t interval over the seeds, mIoU over training, pseudo-label diagnostics) as runs finish.

Layout: ``DIR/runs/ARM/seed_S/`` is an ordinary run directory (plus ``compare.log``, the process's output, and
``compare_run.json``, its wall time and exit status); ``DIR/detectors/KEY/`` holds the detector and detection cache
shared by every arm whose detector is the same (:func:`hafis.detection.identity.detector_identity`: the data, the
labelled images, the detector's training recipe and the seed, never the segmentation arm nor the inference settings,
so training it once per arm would only repeat the same work; arms that differ in ``detector.score_threshold`` keep a
detection cache each beside the one detector). A finished run (its final evaluation is in ``metrics.jsonl``) is
reused, an unfinished one is continued with ``--resume``; a run directory made with another config is reported,
never overwritten.

One job per module: :mod:`.plan` (arms x seeds, validated configs, shared detectors), :mod:`.runs` (a run's folder:
its records, status and config), :mod:`.report` (statistics, ``results.json``'s content, ``report.md``),
:mod:`.tables` (tables over result rows: ``--contrast A:B`` at fractions of the schedule, per-class IoU, final
diagnostics), :mod:`.plots` (``miou.png``, ``diagnostics.png``, chosen arms' curves), :mod:`.records` (``--records
DIR``: the finished runs' records and provenance copied out and put back), :mod:`.join` (several comparisons reported
as one: ``benchmarks/realistic.py``) and :mod:`.pool` (the processes, and the outputs rewritten as runs finish). The
report is a pure function of the runs' metrics, so ``--report-only`` rebuilds it from what exists and tests check it
against a hand computation. ``hafis demo`` is a comparison with fixed arms (:mod:`hafis.demo`).
"""
