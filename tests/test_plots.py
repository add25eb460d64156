"""plan_shared.plots: the figures a person looks at (sample grids, path strips, DCR histograms)."""

import numpy as np
import torch
from PIL import Image

from plan_shared.imaging import image_grid
from plan_shared.plots import dcr_histogram, path_strips, sample_grid, spread_rows


def test_spread_rows_cover_the_whole_set_evenly():
    assert spread_rows(5, 64) == [0, 1, 2, 3, 4]
    rows = spread_rows(1000, 64)
    assert len(rows) == 64 == len(set(rows)) and rows[0] == 0 and rows[-1] == 999
    gaps = np.diff(rows)
    assert gaps.min() >= 15 and gaps.max() <= 16
    assert spread_rows(10, 1) == [0] and spread_rows(10, 0) == [] and spread_rows(0, 64) == []


def test_sample_grid_shows_images_from_the_whole_set_not_its_first_rows(tmp_path):
    # 128 images, each a flat grey level equal to its row: the grid's tiles must run from row 0 to row 127
    levels = torch.linspace(-1, 1, 128)
    images = levels.view(128, 1, 1, 1).expand(128, 1, 8, 8).contiguous()
    path = sample_grid(images, tmp_path / "samples.png", n=16)
    got = np.asarray(Image.open(path))
    want = image_grid(images[spread_rows(128, 16)])
    want = want.repeat(2, axis=0).repeat(2, axis=1)  # save_grid's default upscale
    assert got.shape[:2] == want.shape[:2]
    assert np.array_equal(got.reshape(want.shape), want)
    assert got.min() == 0 and got.max() == 255  # the first and the last image are both in it


def test_path_strips_and_dcr_histogram_write_pngs(tmp_path):
    imgs = torch.rand(5, 1, 8, 8) * 2 - 1
    rows = [{"title": "plan #0", "images": imgs, "id_prob": np.linspace(0.9, 0.1, 5), "dcr": np.linspace(1, 3, 5)}]
    p = path_strips(rows, tmp_path / "strips.png")
    d = dcr_histogram({"plan": np.array([1.0, 2.0, 3.0]), "real": np.array([2.0, 2.5])}, 1.5, tmp_path / "h.png")
    for f in (p, d):
        assert f.is_file() and Image.open(f).size[0] > 100
