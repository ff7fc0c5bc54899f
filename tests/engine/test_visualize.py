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


def test_the_grid_names_the_class_colours_and_gives_each_map_its_range():
    """Hand-made panels: the legend lists the dataset's classes (and ignore, which a mask holds) in the colours the
    masks are drawn in (the VOC colour map: class 1 is (128, 0, 0), class 2 (0, 128, 0)); confidence, reliable and W
    each get a colour bar with their range."""
    import numpy as np

    from hafis.engine.visualize import grid_figure

    gt = np.array([[0, 1], [255, 1]], np.uint8)
    row = {"id": "a", "image": np.zeros((2, 2, 3)), "gt": gt, "pseudo": np.array([[2, 1], [0, 0]]),
           "confidence": np.full((2, 2), 0.5), "reliable": np.array([[True, False], [False, False]]),
           "weight": np.full((2, 2), 1.5)}
    fig = grid_figure([row], (1.0, 2.0), class_names=["background", "disc", "square"], dataset="synthetic")
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["0 background", "1 disc", "2 square", "255 ignore"]
    colours = [tuple(np.round(np.asarray(h.get_facecolor()[:3]) * 255)) for h in legend.legend_handles]
    assert colours[1:] == [(128, 0, 0), (0, 128, 0), (255, 255, 255)]
    axes = np.asarray(fig.axes[:6])
    np.testing.assert_allclose(axes[1].images[0].get_array()[0, 1], np.array([128, 0, 0]) / 255)  # gt class 1
    bars = {j: axes[j].images[0].colorbar for j in (3, 4, 5)}
    assert (bars[3].vmin, bars[3].vmax, bars[3].ax.get_xlabel()) == (0, 1, "top-class probability")
    assert (bars[5].vmin, bars[5].vmax, bars[5].ax.get_xlabel()) == (1, 2, "W, 1 to 2")
    assert [t.get_text() for t in bars[4].ax.get_xticklabels()] == ["not reliable", "reliable"]
