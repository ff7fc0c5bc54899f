import pytest
import torch

from hafis.weighting import topk_index_similarity, topk_mask


def reference_similarity(features, prototypes, k):
    """Plain-Python set intersection, ties broken by the lower index (a stable descending sort)."""
    out = []
    for f, p in zip(features.tolist(), prototypes.tolist(), strict=True):
        top_f = set(sorted(range(len(f)), key=lambda i: (-f[i], i))[:k])
        top_p = set(sorted(range(len(p)), key=lambda i: (-p[i], i))[:k])
        out.append(len(top_f & top_p) / k)
    return torch.tensor(out, dtype=torch.float64).float()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dim,k", [(5, 1), (8, 3), (16, 5), (64, 5), (256, 5), (33, 10)])
def test_matches_set_intersection_reference(seed, dim, k):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(40, dim, generator=g)
    protos = torch.randn(40, dim, generator=g)
    protos[:10] = feats[:10] + 0.05 * torch.randn(10, dim, generator=g)  # some rows with a large overlap
    got = topk_index_similarity(feats, protos, k)
    assert torch.equal(got, reference_similarity(feats, protos, k))


@pytest.mark.parametrize("seed", range(4))
def test_ties_follow_the_index_rule(seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randint(0, 3, (50, 12), generator=g).float()  # many ties
    protos = torch.randint(0, 3, (50, 12), generator=g).float()
    assert torch.equal(topk_index_similarity(feats, protos, 4), reference_similarity(feats, protos, 4))
    mask = topk_mask(feats, 4, dim=1)
    assert torch.equal(mask.sum(1), torch.full((50,), 4))


def test_identical_rows_give_one_and_disjoint_give_zero():
    x = torch.randn(20, 32)
    assert torch.equal(topk_index_similarity(x, x.clone(), 5), torch.ones(20))
    feats = torch.zeros(3, 10)
    protos = torch.zeros(3, 10)
    feats[:, :5] = torch.arange(5, 0, -1).float()
    protos[:, 5:] = 1.0 + torch.arange(5).float()
    assert torch.equal(topk_index_similarity(feats, protos, 5), torch.zeros(3))


def test_invariant_to_positive_scaling_of_a_row():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 64, generator=g)
    protos = torch.randn(30, 64, generator=g)
    scale = torch.rand(30, 1, generator=g) * 100 + 0.01
    assert torch.equal(topk_index_similarity(feats, protos), topk_index_similarity(feats * scale, protos))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(25, 16, generator=g).to(dtype)
    protos = torch.randn(25, 16, generator=g).to(dtype)
    got = topk_index_similarity(feats, protos, 5)
    assert got.dtype == dtype
    shared = reference_similarity(feats.float(), protos.float(), 5).mul(5).round()  # shared channels, 0..5
    assert torch.equal(got, shared.to(dtype) / 5)


def test_no_gradient():
    feats = torch.randn(4, 8, requires_grad=True)
    assert not topk_index_similarity(feats, torch.randn(4, 8)).requires_grad


@pytest.mark.parametrize(
    "feats,protos,k,match",
    [
        (torch.randn(4, 8), torch.randn(4, 8), 9, "k=9"),
        (torch.randn(4, 8), torch.randn(4, 8), 0, "k must be"),
        (torch.randn(4, 8), torch.randn(5, 8), 2, "prototypes"),
        (torch.randn(2, 4, 8), torch.randn(2, 4, 8), 2, "features"),
    ],
)
def test_bad_input(feats, protos, k, match):
    with pytest.raises(ValueError, match=match):
        topk_index_similarity(feats, protos, k)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    feats = torch.randint(0, 4, (500, 64), generator=g).float()
    protos = torch.randint(0, 4, (500, 64), generator=g).float()
    assert torch.equal(topk_index_similarity(feats.cuda(), protos.cuda()).cpu(), topk_index_similarity(feats, protos))


def test_check_k_names_the_key():
    from hafis.weighting.checks import check_k

    check_k(8, 8)
    with pytest.raises(ValueError, match="weighting.k=9 is larger than the feature dimension D=8"):
        check_k(9, 8, "weighting.k")
    for bad in (True, 0, 2.0):
        with pytest.raises(ValueError, match="must be a positive int"):
            check_k(bad, 8)
