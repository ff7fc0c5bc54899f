"""The training streams: :class:`InfiniteSampler`'s seeded epochs, resume start and per-rank shares (index sequences
written out by hand), and data-loading worker processes that change no batch."""

from itertools import islice

import pytest
import torch

from hafis.config import load_config
from hafis.data.ssl import InfiniteSampler
from hafis.engine.trainer import Trainer


def perm(n, seed):
    """The documented order of one epoch: ``randperm(n)`` from a generator seeded ``seed + epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def take(sampler, k):
    return list(islice(iter(sampler), k))


def test_epochs_are_seeded_permutations_one_after_another():
    p0, p1, p2 = perm(3, 5), perm(3, 6), perm(3, 7)
    assert take(InfiniteSampler(3, seed=5), 7) == [(0, p0[0]), (0, p0[1]), (0, p0[2]),
                                                   (1, p1[0]), (1, p1[1]), (1, p1[2]), (2, p2[0])]
    assert sorted(p0) == sorted(p1) == [0, 1, 2]


def test_start_skips_samples_across_an_epoch_boundary():
    p1, p2 = perm(3, 6), perm(3, 7)
    # position 4 of a 3-image stream: epoch 1, offset 1
    assert take(InfiniteSampler(3, seed=5, start=4), 4) == [(1, p1[1]), (1, p1[2]), (2, p2[0]), (2, p2[1])]


def test_ranks_take_alternate_positions_from_the_start():
    p0, p1, p2 = perm(3, 5), perm(3, 6), perm(3, 7)
    # global positions 2..7 from start 2; rank 0 gets 2, 4, 6 and rank 1 gets 3, 5, 7
    assert take(InfiniteSampler(3, seed=5, start=2, rank=0, world_size=2), 3) == [(0, p0[2]), (1, p1[1]), (2, p2[0])]
    assert take(InfiniteSampler(3, seed=5, start=2, rank=1, world_size=2), 3) == [(1, p1[0]), (1, p1[2]), (2, p2[1])]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("start", [0, 5])
def test_rank_shares_interleave_to_the_one_process_stream(world, start):
    one = take(InfiniteSampler(7, seed=1, start=start), 6 * world)
    shares = [take(InfiniteSampler(7, seed=1, start=start, rank=r, world_size=world), 6) for r in range(world)]
    assert [shares[i % world][i // world] for i in range(6 * world)] == one


def test_an_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        InfiniteSampler(0, seed=0)


def _batches(config_path, run_dir, workers, steps):
    config = load_config(config_path, [f"data.num_workers={workers}", f"output_dir={run_dir}"])
    labelled, unlabelled = Trainer(config)._streams()
    try:
        return [(next(labelled), next(unlabelled)) for _ in range(steps)]
    finally:
        labelled.close()
        unlabelled.close()


def _assert_same(a, b, path="batch"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_worker_processes_give_the_same_batches(tmp_path, tiny_config):
    # 5 steps of 2 labelled images cross the 8-image epoch; UniMatch's unlabelled batches carry the mixing stream too
    inline = _batches(tiny_config, tmp_path / "inline", 0, 5)
    workers = _batches(tiny_config, tmp_path / "workers", 2, 5)
    assert len(workers) == 5
    for step, (a, b) in enumerate(zip(inline, workers, strict=True)):
        _assert_same(a[0], b[0], f"step {step} labelled")
        _assert_same(a[1], b[1], f"step {step} unlabelled")
