"""The fast paths of the weighting against exact references written the plain way, ties included."""

import pytest
import torch
import torch.nn.functional as F

from hafis.weighting import PseudoLabelWeighter, similarity, topk_index_similarity, topk_mask
from hafis.weighting.alignment import resize_features
from hafis.weighting.similarity import topk_indices


def reference_topk_mask(x, k, dim=-1):
    """The plain way: the k-th largest value from torch.topk, then the tied entries in index order."""
    kth = torch.topk(x, k, dim=dim, largest=True, sorted=True).values.narrow(dim, k - 1, 1)
    above = x > kth
    tied = x == kth
    free = k - above.sum(dim=dim, keepdim=True)
    return above | (tied & (torch.cumsum(tied, dim=dim) <= free))


def reference_similarity(weighter, features, pseudo_labels):
    """``PseudoLabelWeighter.similarity`` the plain way: an (N x D) mask, one (hw x D)@(D x C) product, a gather."""
    B, H, W = pseudo_labels.shape
    protos, has_proto = weighter.bank.prototypes()
    proto_mask = reference_topk_mask(protos, weighter.k, dim=1) & has_proto[:, None]
    features = features.contiguous(memory_format=torch.channels_last)
    if weighter.align == "bilinear":
        features = resize_features(features, (H, W), "bilinear")
    b, d, h, w = features.shape
    feat_mask = reference_topk_mask(features.permute(0, 2, 3, 1), weighter.k, dim=-1)
    scores = torch.matmul(feat_mask.reshape(b, h * w, d).float(), proto_mask.t().float())
    scores = scores.view(b, h, w, weighter.num_classes).permute(0, 3, 1, 2)
    if (h, w) != (H, W):
        scores = F.interpolate(scores, size=(H, W), mode="nearest")
    labels = pseudo_labels.long()
    ignored = labels == weighter.ignore_index
    s = scores.gather(1, torch.where(ignored, 0, labels)[:, None]).squeeze(1)
    return torch.where(ignored, 0, s.round().long())


def tie_heavy(shape, generator, levels=3):
    return torch.randint(0, levels, shape, generator=generator).float()


INPUTS = {
    "gaussian": lambda g, n, d: torch.randn(n, d, generator=g),
    "relu": lambda g, n, d: torch.relu(torch.randn(n, d, generator=g) - 1.0),  # many exact zeros: ties at the k-th
    "three_levels": lambda g, n, d: tie_heavy((n, d), g),
    "constant": lambda g, n, d: torch.ones(n, d),
    "signed_zeros": lambda g, n, d: torch.where(torch.rand(n, d, generator=g) < 0.5, -0.0, 0.0),
    "minus_inf": lambda g, n, d: torch.where(torch.rand(n, d, generator=g) < 0.9, float("-inf"),
                                             tie_heavy((n, d), g, 2)),
    "plus_inf": lambda g, n, d: torch.where(torch.rand(n, d, generator=g) < 0.3, float("inf"), tie_heavy((n, d), g)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("d,k", [(1, 1), (5, 5), (8, 3), (64, 5), (256, 5), (33, 10)])
def test_topk_mask_equals_the_reference(kind, d, k, dtype):
    g = torch.Generator().manual_seed(d * 100 + k)
    x = INPUTS[kind](g, 300, d).to(dtype)
    got = topk_mask(x, k, dim=1)
    assert torch.equal(got, reference_topk_mask(x, k, dim=1))
    assert torch.equal(got.sum(1), torch.full((300,), k))


def test_all_minus_inf_rows_take_the_lowest_unchosen_indices():
    x = torch.full((2, 6), float("-inf"))
    x[0, 4] = 1.0
    assert topk_indices(x, 3, dim=1).tolist() == [[4, 0, 1], [0, 1, 2]]


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    """Intra-op threads of the caller: the result must not depend on them."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("block_bytes", [4, 1000, 1 << 20])
def test_blocks_do_not_change_the_result(monkeypatch, block_bytes, threads):
    monkeypatch.setattr(similarity, "CPU_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    x = tie_heavy((257, 40), g, 4)
    idx = topk_indices(x, 5, dim=1)
    assert torch.equal(torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx, True), reference_topk_mask(x, 5, 1))
    values = x.gather(1, idx)
    assert (values[:, :-1] >= values[:, 1:]).all()  # largest first
    tied = values[:, :-1] == values[:, 1:]
    assert (idx[:, :-1][tied] < idx[:, 1:][tied]).all()  # ties in index order


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_any_dim_and_layout(dim, contiguous):
    g = torch.Generator().manual_seed(1)
    x = tie_heavy((7, 9, 11), g).permute(2, 0, 1)  # not contiguous
    if contiguous:  # a reduced dim other than the last: the column path
        x = x.contiguous()
    assert torch.equal(topk_mask(x, 3, dim), reference_topk_mask(x, 3, dim))
    assert topk_indices(x, 3, dim).shape[dim] == 3


@pytest.mark.parametrize("block_bytes", [8, 5000, 1 << 22])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_channels_first_columns_equal_the_reference(monkeypatch, block_bytes, kind, threads):
    monkeypatch.setattr(similarity, "CPU_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(7)
    x = INPUTS[kind](g, 3 * 11 * 13, 20).view(3, 11, 13, 20).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
    idx = topk_indices(x, 5, dim=1)
    assert idx.shape == (3, 5, 11, 13)
    assert torch.equal(torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx, True), reference_topk_mask(x, 5, 1))
    rows = x.permute(0, 2, 3, 1).reshape(-1, 20)
    assert torch.equal(idx.permute(0, 2, 3, 1).reshape(-1, 5), topk_indices(rows, 5, dim=1))  # same order too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32])
def test_dtypes(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(100, 20, generator=g) * 3).to(dtype)
    assert torch.equal(topk_mask(x, 5, 1), reference_topk_mask(x, 5, 1))
    x = tie_heavy((100, 20), g).to(dtype)
    assert torch.equal(topk_mask(x, 5, 1), reference_topk_mask(x, 5, 1))


def test_empty_rows():
    assert topk_indices(torch.zeros(0, 8), 2, dim=1).shape == (0, 2)
    assert topk_mask(torch.zeros(3, 0, 8), 2, dim=-1).shape == (3, 0, 8)
    assert topk_indices(torch.zeros(2, 8, 0), 2, dim=1).shape == (2, 2, 0)  # channels-first, no pixels
    assert topk_indices(torch.zeros(0, 8, 3), 2, dim=1).shape == (0, 2, 3)


def test_similarity_equals_mask_intersection_with_ties():
    g = torch.Generator().manual_seed(3)
    feats, protos = tie_heavy((500, 16), g), tie_heavy((500, 16), g)
    expected = (reference_topk_mask(feats, 4, 1) & reference_topk_mask(protos, 4, 1)).sum(1).float() / 4
    assert torch.equal(topk_index_similarity(feats, protos, 4), expected)


@pytest.mark.parametrize("align", ["bilinear", "nearest"])
@pytest.mark.parametrize("kind", ["gaussian", "relu", "ties"])
@pytest.mark.parametrize("size", [(6, 6), (13, 11), (24, 24)])
def test_weighter_equals_the_reference(align, kind, size):
    g = torch.Generator().manual_seed(sum(size))
    C, D = 5, 12
    weighter = PseudoLabelWeighter(num_classes=C, feature_dim=D, k=3, align=align, samples_per_class=16)
    make = {"gaussian": lambda s: torch.randn(s, generator=g),
            "relu": lambda s: torch.relu(torch.randn(s, generator=g)),
            "ties": lambda s: tie_heavy(s, g)}[kind]
    weighter.update_labelled(make((2, D, 6, 6)), torch.randint(0, C - 1, (2, 6, 6), generator=g))  # class 4: none
    feats = make((3, D, 6, 6))
    pseudo = torch.randint(0, C, (3, *size), generator=g)
    pseudo[:, 0, :3] = 255
    got = weighter.similarity(feats, pseudo)
    assert torch.equal(got, reference_similarity(weighter, feats, pseudo))
    assert got.dtype == torch.long and got.shape == pseudo.shape


def reference_select(seed, draws, features, labels, mask, num_classes, quota):
    """What ``PrototypeBank._select`` documents, written per class with Python's sort: every pixel draws ``U[0, 1/2)``
    (the bank's generator, seeded ``seed``, on its ``draws``-th push); a class's qualifying pixels are taken in
    ascending ``class + draw`` (float32; ties by pixel index), at most ``quota``; the features are the bilinearly
    upsampled map (``align_corners=True``) at those pixels. Returns ``{class: [(image, y, x, feature), ...]}``."""
    B, H, W = labels.shape
    g = torch.Generator().manual_seed(seed)
    for _ in range(draws + 1):
        noise = torch.rand(labels.shape, generator=g) * 0.5
    upsampled = F.interpolate(features, size=(H, W), mode="bilinear", align_corners=True)
    chosen = {}
    for c in range(num_classes):
        pixels = [(b, y, x) for b in range(B) for y in range(H) for x in range(W)
                  if labels[b, y, x] == c and mask[b, y, x]]
        key = {p: (float(torch.tensor(float(c)) + noise[p]), (p[0] * H + p[1]) * W + p[2]) for p in pixels}
        chosen[c] = [(*p, upsampled[p[0], :, p[1], p[2]]) for p in sorted(pixels, key=key.get)[:quota]]
    return chosen


@pytest.mark.parametrize("seed", range(3))
def test_bank_selection_equals_a_per_class_sort(seed):
    from hafis.weighting import PrototypeBank

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 8, 5, 5, generator=g)
    labels = torch.randint(0, 6, (3, 10, 10), generator=g)
    labels[labels == 5] = 255
    mask = torch.rand(3, 10, 10, generator=g) < 0.7
    bank = PrototypeBank(5, 8, samples_per_class=7, seed=seed)
    for draw, quota in enumerate((7, 7, 5)):  # the generator advances push by push; a rank's quota may be below n
        values, valid = bank._select(feats, labels, mask, 7, quota)
        expected = reference_select(seed, draw, feats, labels, mask, 5, quota)
        assert values.shape == (5, 7, 8) and valid.shape == (5, 7)
        for c, rows in expected.items():
            assert valid[c].tolist() == [i < len(rows) for i in range(7)]
            for i, (*_, feature) in enumerate(rows):
                torch.testing.assert_close(values[c, i], feature, rtol=0, atol=1e-6)


def test_bank_selection_by_hand():
    from hafis.weighting import PrototypeBank

    # one 2x3 image; each pixel's feature is its index; class 0 qualifies at 0, 2, 4 (3 is masked out), class 1 at 1
    labels = torch.tensor([[[0, 1, 0], [0, 0, 255]]])
    mask = torch.tensor([[[True, True, True], [False, True, True]]])
    feats = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3)
    values, valid = PrototypeBank(3, 1, samples_per_class=2)._select(feats, labels, mask)
    assert valid.tolist() == [[True, True], [True, False], [False, False]]
    assert set(values[0, :, 0].tolist()) < {0.0, 2.0, 4.0} and values[1, 0, 0] == 1.0
    everything, valid = PrototypeBank(3, 1, samples_per_class=4)._select(feats, labels, mask)
    assert sorted(everything[0][valid[0]].flatten().tolist()) == [0.0, 2.0, 4.0]


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(2, 16, 6, 6, generator=g)).to(device)
    return feats, torch.randint(0, 4, (2, 24, 24), generator=g).to(device)


def _run_weighting_step(weighter, feats, labels):
    weighter.update_labelled(feats, labels, labels != 0)
    weighter.update_unlabelled(feats, labels, labels != 1)
    return weighter.weights(feats, labels)


@pytest.mark.parametrize("align", ["bilinear", "nearest"])
def test_hot_path_never_reads_a_tensor_on_the_host(monkeypatch, align):
    """With validation off, bank pushes and weights call none of the Python-level host reads of a tensor."""
    weighter = PseudoLabelWeighter(num_classes=4, feature_dim=16, k=5, align=align, validate=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor in the weighting hot path")

    feats, labels = _inputs()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    w = _run_weighting_step(weighter, feats, labels)
    monkeypatch.undo()
    assert w.shape == (2, 24, 24)


@pytest.mark.cuda
def test_hot_path_has_no_cuda_sync():
    weighter = PseudoLabelWeighter(num_classes=4, feature_dim=16, k=5, validate=False).cuda()
    feats, labels = _inputs("cuda")
    _run_weighting_step(weighter, feats, labels)  # warm-up: generators, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_weighting_step(weighter, feats, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_reused_resize_buffer_gives_the_reference_on_every_call():
    g = torch.Generator().manual_seed(5)
    weighter = PseudoLabelWeighter(num_classes=4, feature_dim=8, k=3, samples_per_class=16)
    weighter.update_labelled(torch.randn(2, 8, 6, 6, generator=g), torch.randint(0, 4, (2, 6, 6), generator=g))
    for size, label_size in [((6, 6), (20, 20)), ((6, 6), (20, 20)), ((5, 7), (13, 9)), ((6, 6), (20, 20))]:
        feats = torch.randn(3, 8, *size, generator=g)
        pseudo = torch.randint(0, 4, (3, *label_size), generator=g)
        assert torch.equal(weighter.similarity(feats, pseudo), reference_similarity(weighter, feats, pseudo))
    assert "_resize_buffer" not in weighter.state_dict()
