"""The detector step of the method (docs/method.md, 1): a Faster R-CNN trained on the labelled images, run once over
the unlabelled images, its detections cached on disk; the trainer then reads the box masks of the detections it
trusts (``weighting.reliable: detector``).

One module per job:

- :mod:`.step`: ``hafis detect`` (:func:`~.step.run_detect`: train or load the detector, fill the cache) and the
  trainer's side (:func:`~.step.box_mask_provider`, which stops with the command to run when the cache is missing);
- :mod:`.identity`: what makes two detectors, or two sets of detections, the same (:func:`~.identity.detector_identity`:
  the recipe check of ``hafis detect`` and the detector folders ``hafis compare`` shares between arms);
- :mod:`.cache`: the detection cache file (resumable, checked) and the box masks read from it;
- :mod:`.train` / :mod:`.infer`: the detector's training boxes and loop; its inference;
- :mod:`.networks`: the architectures of ``detector.arch`` (name -> builder).

The networks live here rather than in :mod:`hafis.models` because nothing else builds them: ``models/`` holds the
segmenters that ``model.*`` configures, this package everything ``detector.*`` configures.

Nothing is imported here, so ``hafis.detection.identity`` (what ``hafis compare`` plans with) loads without torch's
detection code.
"""
