"""A run's training streams: endless labelled and unlabelled batches on the run's device, as the framework's
:class:`~hafis.frameworks.Traits` ask for them, seeded so that a run resumed at iteration ``t`` replays the batches
an uninterrupted one sees (:mod:`hafis.data.ssl`). ``trainer``: the :class:`~hafis.engine.trainer.Trainer`."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from hafis.data.ssl import (
    MIX_STREAM,
    InfiniteSampler,
    LabelledBatch,
    LabelledDataset,
    UnlabelledBatch,
    UnlabelledDataset,
)


def _with_mix(batches: Iterator[dict], mix: Iterator[dict]) -> Iterator[dict]:
    for batch, other in zip(batches, mix, strict=False):
        yield {**batch, "mix": other}


def _to_device(value, device: torch.device, channels_last: bool):
    if not torch.is_tensor(value):
        return value
    value = value.to(device, non_blocking=True)
    if channels_last and value.dim() == 4 and value.is_floating_point():  # images, not masks
        value = value.contiguous(memory_format=torch.channels_last)
    return value


def batches(trainer, dataset, batch_size: int, seed: int) -> Iterator[dict]:
    """``dataset``'s batches from ``trainer.iteration`` on, this rank's share, on ``trainer.device``."""
    dist, device, c = trainer.dist, trainer.device, trainer.config
    # the stream is global (start counts global samples); each rank takes its share of every global batch
    sampler = InfiniteSampler(len(dataset), seed, start=trainer.iteration * batch_size * dist.world_size,
                              rank=dist.rank, world_size=dist.world_size)
    # a loader of its own generator: creating its iterator must not draw from the global RNG, or a resumed run
    # (whose loaders start at another point of the RNG stream) would diverge from an uninterrupted one
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=c.data.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=c.data.num_workers > 0, generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        yield {k: _to_device(v, device, c.train.channels_last) for k, v in batch.items()}


def training_streams(trainer) -> tuple[Iterator[LabelledBatch], Optional[Iterator[UnlabelledBatch]]]:
    """The labelled stream, and the unlabelled one (with ``mix`` batches where ``Traits.mix_batch`` asks; None when
    the framework reads no unlabelled images), from the trainer's sources, box masks and per-rank batch sizes."""
    c, traits = trainer.config, trainer.framework.traits
    geometry = traits.geometry
    labelled = batches(trainer, LabelledDataset(trainer.labelled_source, c.data.crop_size, c.data.scale_range, c.seed,
                                                geometry), trainer.batch_size, c.seed)
    unlabelled = None
    if traits.uses_unlabelled:
        dataset = UnlabelledDataset(trainer.unlabelled_source, c.data.crop_size, c.data.scale_range, c.seed,
                                    traits.cutmix_prob, box_masks=trainer.box_masks, geometry=geometry,
                                    strong_views=traits.strong_views)
        unlabelled = batches(trainer, dataset, trainer.unlabelled_batch_size, c.seed + 1)
        if traits.mix_batch:
            # a second unlabelled stream (own augmentations; the main stream's order for same_images, its own
            # for other_images) for the mixed-in images; it advances in step with the first, so a resumed run
            # replays it too
            mix = UnlabelledDataset(trainer.unlabelled_source, c.data.crop_size, c.data.scale_range, c.seed,
                                    traits.cutmix_prob, box_masks=trainer.box_masks, stream=MIX_STREAM,
                                    geometry=geometry, strong_views=traits.strong_views)
            order = c.seed + 1 if traits.mix_batch == "same_images" else c.seed + 2
            unlabelled = _with_mix(unlabelled, batches(trainer, mix, trainer.unlabelled_batch_size, order))
    return labelled, unlabelled
