import pytest
import torch

from hafis.weighting import PrototypeBank


def image(values, labels):
    """features (1, D, 1, n) from a list of n D-vectors, labels (1, 1, n)."""
    feats = torch.tensor(values, dtype=torch.float32).T[None, :, None, :]
    return feats, torch.tensor(labels)[None, None, :]


def test_prototypes_are_means_of_both_queues():
    bank = PrototypeBank(num_classes=3, feature_dim=2, memory_per_class=8, samples_per_class=8)
    f, y = image([[1, 2], [3, 4], [10, 0], [7, 7]], [0, 0, 1, 255])
    bank.push_labelled(f, y)
    f, y = image([[5, 6], [0, 20]], [0, 1])
    bank.push_unlabelled(f, y, torch.ones_like(y, dtype=torch.bool))
    protos, has = bank.prototypes()
    assert has.tolist() == [True, True, False]
    assert torch.allclose(protos[0], torch.tensor([(1 + 3 + 5) / 3, (2 + 4 + 6) / 3]))
    assert torch.allclose(protos[1], torch.tensor([5.0, 10.0]))
    assert torch.equal(protos[2], torch.zeros(2))


def test_fifo_keeps_exactly_the_newest():
    bank = PrototypeBank(num_classes=2, feature_dim=1, memory_per_class=3, samples_per_class=3)
    for value in range(1, 8):  # one class-0 pixel per push: 1, 2, ..., 7
        f, y = image([[value], [100 + value]], [0, 1])
        bank.push_labelled(f, y, torch.tensor([[[True, value % 2 == 0]]]))
        expected = list(range(max(1, value - 2), value + 1))
        assert bank.labelled.contents(0).flatten().tolist() == expected
    assert bank.labelled.contents(1).flatten().tolist() == [102, 104, 106]
    assert torch.allclose(bank.prototypes()[0][0], torch.tensor([6.0]))


def test_a_large_push_keeps_capacity_and_its_own_vectors():
    bank = PrototypeBank(num_classes=1, feature_dim=1, memory_per_class=4, samples_per_class=10)
    f, y = image([[v] for v in range(50)], [0] * 50)
    bank.push_labelled(f, y)
    kept = bank.labelled.contents(0).flatten().tolist()
    assert len(kept) == 4 and len(set(kept)) == 4 and set(kept) <= set(range(50))
    assert int(bank.labelled.count[0]) == 4


def test_subsample_per_class_and_seeded():
    def run(seed):
        bank = PrototypeBank(num_classes=2, feature_dim=1, memory_per_class=64, samples_per_class=5, seed=seed)
        f, y = image([[v] for v in range(40)], [v % 2 for v in range(40)])
        bank.push_labelled(f, y)
        return bank.labelled.contents(0).flatten().tolist(), bank.labelled.contents(1).flatten().tolist()

    even, odd = run(0)
    assert len(even) == 5 and all(v % 2 == 0 for v in even)
    assert len(odd) == 5 and all(v % 2 == 1 for v in odd)
    assert run(0) == (even, odd)
    assert run(1) != (even, odd)


def test_ignored_and_masked_pixels_never_enter():
    bank = PrototypeBank(num_classes=2, feature_dim=1, memory_per_class=64, samples_per_class=64)
    values = [[v] for v in range(30)]
    labels = [255 if v % 3 == 0 else v % 2 for v in range(30)]
    mask = torch.tensor([[[v % 5 != 0 for v in range(30)]]])
    f, y = image(values, labels)
    bank.push_unlabelled(f, y, mask)
    stored = set(bank.unlabelled.contents(0).flatten().tolist()) | set(bank.unlabelled.contents(1).flatten().tolist())
    assert stored == {v for v in range(30) if v % 3 != 0 and v % 5 != 0}
    assert int(bank.labelled.count.sum()) == 0


@pytest.mark.parametrize("align_corners", [True, False])
def test_lower_resolution_features_are_read_bilinearly(align_corners):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 3, 3, generator=g)
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    bank = PrototypeBank(num_classes=1, feature_dim=4, memory_per_class=72, samples_per_class=72,
                         align_corners=align_corners)
    bank.push_labelled(feats, labels)
    up = torch.nn.functional.interpolate(feats, size=(6, 6), mode="bilinear", align_corners=align_corners)
    assert torch.allclose(bank.prototypes()[0][0], up.mean(dim=(0, 2, 3)), atol=1e-6)


def test_require_labelled_gives_a_prototype_only_to_classes_with_labelled_features():
    feats = torch.zeros(1, 4, 2, 2)
    feats[0, 1] = 1.0
    labels = torch.tensor([[[0, 0], [1, 1]]])
    both = [PrototypeBank(num_classes=3, feature_dim=4, samples_per_class=4, require_labelled=r) for r in (0, 1)]
    for bank in both:
        bank.push_labelled(feats, torch.zeros_like(labels))   # class 0 labelled
        bank.push_unlabelled(feats, labels, torch.ones_like(labels, dtype=torch.bool))  # classes 0 and 1 unlabelled
    assert both[0].prototypes()[1].tolist() == [True, True, False]
    protos, has = both[1].prototypes()
    assert has.tolist() == [True, False, False]
    assert protos[1].abs().sum() == 0 and protos[0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_state_round_trip_continues_identically():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (2, 4, 4), generator=g)
    bank = PrototypeBank(num_classes=3, feature_dim=3, memory_per_class=6, samples_per_class=2, seed=5)
    bank.push_labelled(f, y)
    bank.push_unlabelled(f * 2, y, y > 0)
    state = bank.state_dict()
    twin = PrototypeBank(num_classes=3, feature_dim=3, memory_per_class=6, samples_per_class=2, seed=99)
    twin.load_state_dict(state)
    assert torch.equal(twin.prototypes()[0], bank.prototypes()[0])
    for b in (bank, twin):
        b.push_labelled(f + 1, y)
    assert torch.equal(twin.prototypes()[0], bank.prototypes()[0])
    assert torch.equal(twin.labelled.queue, bank.labelled.queue)


@pytest.mark.parametrize(
    "labels,match",
    [
        (torch.full((1, 2, 2), 3), "labels contains 3"),
        (torch.full((1, 2, 2), -1), "labels contains -1"),
        (torch.zeros(1, 2), "labels must be"),
        (torch.zeros(1, 2, 2).float(), "integer"),
    ],
)
def test_bad_labels(labels, match):
    bank = PrototypeBank(num_classes=3, feature_dim=2)
    with pytest.raises(ValueError, match=match):
        bank.push_labelled(torch.zeros(1, 2, 2, 2), labels)


def test_bad_features_and_mask():
    bank = PrototypeBank(num_classes=3, feature_dim=2)
    with pytest.raises(ValueError, match="feature_dim=2"):
        bank.push_labelled(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="reliable"):
        bank.push_unlabelled(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                             torch.ones(1, 3, 3, dtype=torch.bool))
