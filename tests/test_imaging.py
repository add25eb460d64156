"""PNG writing of images and grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from plan_shared.imaging import image_grid, save_grid, to_uint8_hwc


def test_to_uint8_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    assert to_uint8_hwc(x).ravel().tolist() == [0, 128, 255, 255]


def test_grid_layout_and_png(tmp_path):
    imgs = torch.rand(5, 3, 4, 4) * 2 - 1
    g = image_grid(imgs, nrow=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    p = save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "a" / "g.png", upscale=2)
    with Image.open(p) as im:
        assert im.mode == "L" and im.size == (2 * (2 * 10 + 2),) * 2
    assert np.asarray(Image.open(p)).max() == 128
