import os
from pathlib import Path

import pytest
import torch

# Tests run two at a time (pytest -n 2) on 2 cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests need a CUDA device: skipped without one (``pytest -m cuda`` selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_native_cpu_bf16(monkeypatch):
    """``train.amp: auto`` (the tiny configs) resolves as on a CPU without native bf16, so the tests run the same
    float32 step, and assert the same numbers, on every machine; a test of the resolution patches the probe itself.
    Tests that train in a subprocess pass ``train.amp=off``."""
    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated data goes to a per-session cache, never the user's ~/.cache."""
    cache = os.environ.get("HAFIS_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "hafis-cache")
    monkeypatch.setenv("HAFIS_CACHE", cache)


@pytest.fixture(scope="session")
def tiny_config():
    """``configs/tiny/unimatch.yaml``: the few-second CPU run the end-to-end tests start from."""
    return Path(__file__).resolve().parents[1] / "configs" / "tiny" / "unimatch.yaml"


@pytest.fixture
def conv_output_dtypes():
    """The dtypes of every convolution's output in training-mode forwards while the test runs (a global hook)."""
    dtypes: set = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    yield dtypes
    handle.remove()
