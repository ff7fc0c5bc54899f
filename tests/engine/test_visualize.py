from pathlib import Path

from PIL import Image

from hafis.cli import main


def test_visualize_writes_grids_from_a_checkpoint(tmp_path, capsys, tiny_config):
    args = ["weighting.enabled=true", "weighting.reliable=confidence", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", str(tiny_config), *args]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt_00000003.pt"
    capsys.readouterr()
    assert main(["visualize", str(tiny_config), *args, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pics"),
                 "--images", "0,1,2,3,4"]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["unlabelled_000.png", "unlabelled_001.png"]
    with Image.open(written[0]) as im:
        assert im.size[0] > im.size[1] > 100  # 4 rows x 6 columns of panels
    assert main(["visualize", str(tiny_config), *args, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "p2"),
                 "--split", "val", "--images", "99"]) == 2
    assert "outside the val split" in capsys.readouterr().err
