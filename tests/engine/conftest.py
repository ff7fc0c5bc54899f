"""What the engine tests share: an exact comparison of two checkpoints' states."""

import pytest
import torch


def _assert_states_equal(a, b, path="state"):
    """Nested dicts / lists / tensors equal bit for bit (NaN equals NaN); ``path`` names the first difference."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_states_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path


@pytest.fixture
def assert_states_equal():
    """``assert_states_equal(a, b, name)``: two checkpoint entries are identical."""
    return _assert_states_equal
