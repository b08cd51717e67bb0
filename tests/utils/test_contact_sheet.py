"""Contact sheets: layout and where the outline lands."""

import numpy as np
import pytest

from retrieval_ext.utils.contact_sheet import Tile, contact_sheets, draw_tile


def test_pages_and_layout():
    tiles = [Tile(np.zeros((60, 80, 3), np.uint8), [f"t{i}"]) for i in range(7)]
    pages = contact_sheets(tiles, per_sheet=4, columns=2, side=100)
    # 7 tiles, 4 a page: 2 pages of 2 x 2 tiles of (100 + 34) x (100 + 25) px, 4 px apart
    assert len(pages) == 2
    assert pages[0].shape == (2 * 134 + 3 * 4, 2 * 125 + 3 * 4, 3)
    assert pages[1].shape == pages[0].shape
    # the last page's fourth slot is empty (grey)
    assert (pages[1][4 + 134 + 4 + 10, 4 + 125 + 4 + 10] == 128).all()
    with pytest.raises(ValueError):
        contact_sheets(tiles, per_sheet=0)


def test_outline_is_drawn_at_the_scaled_position():
    # a 200 x 100 black photo shrunk to fit 100 px: scale 0.5
    quad = np.array([[40, 20], [160, 20], [160, 80], [40, 80]], dtype=np.float64)
    out = draw_tile(Tile(np.zeros((100, 200, 3), np.uint8), ["x"], quad=quad, good=True), 100)
    # continuous (40, 20)-(160, 80) -> (20, 10)-(80, 40) in the tile, i.e. pixel-centre
    # coordinates 19.5 .. 79.5 and 9.5 .. 39.5; the line's intensity-weighted centre lies there
    g = out[:50, :100, 1].astype(np.float64) * (out[:50, :100, 2] < 100)
    row = g[25]  # a row through both vertical sides
    left, right = np.arange(0, 50), np.arange(50, 100)
    assert np.average(left, weights=row[:50]) == pytest.approx(19.5, abs=0.5)
    assert np.average(right, weights=row[50:]) == pytest.approx(79.5, abs=0.5)
    col = g[:, 50]  # a column through both horizontal sides
    top, bottom = np.arange(0, 25), np.arange(25, 50)
    assert np.average(top, weights=col[:25]) == pytest.approx(9.5, abs=0.5)
    assert np.average(bottom, weights=col[25:]) == pytest.approx(39.5, abs=0.5)
    red = draw_tile(Tile(np.zeros((100, 200, 3), np.uint8), ["x"], quad=quad, good=False), 100)
    assert ((red[:, :, 2] > 150) & (red[:, :, 1] < 100)).any()
