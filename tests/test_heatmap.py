"""Heat-map palettes: the poster's green/red and the colour-blind-safe blue/orange."""

import numpy as np
import pytest

from drig.attribution import heatmap


@pytest.mark.parametrize("palette", sorted(heatmap.PALETTES))
def test_sign_picks_the_palette_colour_and_magnitude_its_intensity(palette):
  positive, negative = heatmap.PALETTES[palette]
  values = np.array([[2.0, -2.0], [1.0, 0.0]])
  rgb = heatmap.green_red(values, clip=2.0, palette=palette)
  np.testing.assert_allclose(rgb[0, 0], positive, atol=1e-6)
  np.testing.assert_allclose(rgb[0, 1], negative, atol=1e-6)
  np.testing.assert_allclose(rgb[1, 0], positive / 2, atol=1e-6)
  np.testing.assert_allclose(rgb[1, 1], 0.0)
  cmap = heatmap.colormap(palette)
  np.testing.assert_allclose(cmap(1.0)[:3], positive, atol=1e-2)
  np.testing.assert_allclose(cmap(0.0)[:3], negative, atol=1e-2)
  np.testing.assert_allclose(cmap(0.5)[:3], 0.0, atol=1e-2)


def test_the_default_is_the_posters_green_and_red():
  rgb = heatmap.green_red(np.array([[1.0, -1.0]]), clip=1.0)
  np.testing.assert_allclose(rgb[0], [heatmap.GREEN, heatmap.RED])


def test_colorblind_overlay_and_show_use_blue_and_orange():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  image = np.zeros((2, 2, 3), np.uint8)
  painted = heatmap.overlay(image, np.array([[1.0, -1.0], [0, 0]]), clip=1.0,
                            palette="colorblind")
  np.testing.assert_allclose(painted[0, 0], heatmap.BLUE, atol=1e-6)
  np.testing.assert_allclose(painted[0, 1], heatmap.ORANGE, atol=1e-6)
  fig, ax = plt.subplots()
  heatmap.show(ax, np.array([[1.0, -1.0]]), palette="colorblind")
  colorbar = fig.axes[-1]
  assert colorbar is not ax
  plt.close(fig)


def test_unknown_palette_is_named():
  with pytest.raises(ValueError, match="unknown palette 'rainbow'.*colorblind.*poster"):
    heatmap.green_red(np.ones((2, 2)), palette="rainbow")
