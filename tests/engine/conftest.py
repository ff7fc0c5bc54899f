"""What the engine tests share: an exact comparison of two checkpoints' states, two torchrun ranks on CPU."""

import os
import subprocess
import sys
from pathlib import Path

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
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path


@pytest.fixture
def assert_states_equal():
    """``assert_states_equal(a, b, name)``: two checkpoint entries are identical."""
    return _assert_states_equal


def _two_ranks(worker: Path, out: Path, config: Path) -> list:
    """Run ``worker OUT CONFIG`` as two torchrun ranks (gloo, one thread each); what each saved to
    ``OUT/rank{r}.pt``."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(out), str(config)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="session")
def two_ranks():
    """``two_ranks(worker, out, config)``: what each of two torchrun ranks of ``worker`` saved."""
    return _two_ranks
