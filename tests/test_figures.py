"""The poster's figures: written as PNG, read back and checked pixel by pixel.

Each figure is saved, read back with matplotlib.image.imread and cropped to a
panel's on-screen box (from the axes' window extent), so the checks are about
what a reader sees: size, not blank, green where the map is positive and red
where it is negative, on one colour scale where the figure promises one.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.figure import Figure

from drig.analysis import figures

SIZE = 64


def _image(seed=0, size=SIZE):
  """A fundus-like uint8 image: a textured disc on half gray."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[:size, :size]
  disc = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 < (0.45 * size) ** 2
  image = rng.integers(60, 200, (size, size, 3)).astype(np.uint8)
  image[~disc] = 128
  return image


def _blob(cy, cx, sigma=4.0, size=SIZE):
  ys, xs = np.mgrid[:size, :size]
  return np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def _save_and_read(fig, tmp_path, name):
  path = figures.save_figure(fig, tmp_path / "out" / name, dpi=int(fig.dpi))
  assert isinstance(path, str) and os.path.isfile(path)
  pixels = mpimg.imread(path)[..., :3]  # float32 [H, W, 3] in [0, 1]
  return pixels


def _panel(fig, ax, pixels):
  """The part of the PNG inside `ax` (figure drawn at the saving dpi)."""
  box = ax.get_window_extent(fig.canvas.get_renderer())
  height = pixels.shape[0]
  top, bottom = int(np.ceil(height - box.y1)) + 1, int(np.floor(height - box.y0)) - 1
  left, right = int(np.ceil(box.x0)) + 1, int(np.floor(box.x1)) - 1
  assert 0 <= top < bottom <= height and 0 <= left < right <= pixels.shape[1]
  return pixels[top:bottom, left:right]


def _green(rgb):
  return (rgb[..., 1] > 0.5) & (rgb[..., 0] < 0.25) & (rgb[..., 2] < 0.25)


def _red(rgb):
  return (rgb[..., 0] > 0.5) & (rgb[..., 1] < 0.25) & (rgb[..., 2] < 0.25)


def _centre_of(mask):
  ys, xs = np.nonzero(mask)
  return ys.mean() / mask.shape[0], xs.mean() / mask.shape[1]


def test_lesion_figure(tmp_path):
  image = _image()
  photo = np.repeat(np.repeat(_image(1, 40), 3, axis=0), 2, axis=1)  # any size: 120 x 80
  # Positive neurons: strongly positive upper left, weakly negative lower right.
  positive = _blob(16, 16) - 0.3 * _blob(48, 48)
  negative = -_blob(44, 20)  # lower left, negative only
  fig = figures.lesion_figure(photo, image, positive, negative, title="image 0, grade 2")
  pixels = _save_and_read(fig, tmp_path, "lesion.png")
  assert pixels.shape == (800, 800, 3)  # 8 x 8 inches at 100 dpi
  assert pixels.std() > 0.05
  photo_panel, input_panel, positive_panel, negative_panel = (
      _panel(fig, ax, pixels) for ax in fig.axes[:4])
  assert photo_panel.std() > 0.05 and input_panel.std() > 0.05
  green = _green(positive_panel)
  assert green.sum() > 20 and _red(positive_panel).sum() > 0  # both signs shown
  cy, cx = _centre_of(green)
  assert cy < 0.4 and cx < 0.4, (cy, cx)  # where the positive blob is
  red = _red(negative_panel)
  assert red.sum() > 20 and _green(negative_panel).sum() == 0
  cy, cx = _centre_of(red)
  assert cy > 0.55 and cx < 0.45, (cy, cx)
  assert len(fig.axes) == 6  # four panels and two colour bars


def test_lesion_figure_shares_one_scale_unless_asked():
  image = _image()
  weak = -0.1 * _blob(32, 32)
  strong = _blob(32, 32)
  shared = figures.lesion_figure(None, image, strong, weak)
  separate = figures.lesion_figure(None, image, strong, weak, shared_scale=False)
  limits = [[cb_ax.get_ylim() for cb_ax in fig.axes[4:]] for fig in (shared, separate)]
  assert limits[0][0] == pytest.approx(limits[0][1])
  assert limits[1][1][1] < 0.5 * limits[1][0][1]  # the weak map got its own, smaller clip


def test_quantity_pair_figure_is_complementary_on_one_scale(tmp_path):
  image = _image()
  grade0 = _blob(20, 40)
  grade4 = -0.3 * _blob(20, 40)[..., None].repeat(3, axis=-1) / 3  # [H, W, 3] attributions
  # percentile=100: full intensity at the largest |value| of both maps (grade 0's peak).
  fig = figures.quantity_pair_figure(image, {"grade 0": grade0, "grade 4": grade4},
                                     title="sample 3", percentile=100.0)
  pixels = _save_and_read(fig, tmp_path, "pair.png")
  assert pixels.shape == (460, 900, 3)
  assert pixels.std() > 0.05
  left, right = (_panel(fig, ax, pixels) for ax in fig.axes[:2])
  assert [ax.get_title() for ax in fig.axes[:2]] == ["grade 0", "grade 4"]
  assert _green(left).sum() > 20 and _red(left).sum() == 0
  # Same place, opposite sign, at 0.3 of the intensity: one colour scale.
  red_strength = right[..., 0] - right[..., 1]
  green_strength = left[..., 1] - left[..., 0]
  assert red_strength.max() > 0.1 and _green(right).sum() == 0
  assert green_strength.max() > 0.95
  assert red_strength.max() == pytest.approx(0.3, abs=0.05)
  cy, cx = _centre_of(red_strength > 0.5 * red_strength.max())
  assert cy < 0.45 and cx > 0.5, (cy, cx)


def test_group_sum_figure_on_half_gray(tmp_path):
  summed = _blob(20, 20) - _blob(44, 44)
  fig = figures.group_sum_figure(None, summed, title="correct grade 2")
  pixels = _save_and_read(fig, tmp_path, "group.png")
  assert pixels.shape == (460, 500, 3)
  panel = _panel(fig, fig.axes[0], pixels)
  assert _green(panel).sum() > 20 and _red(panel).sum() > 20
  # Where the map is ~0 the background is half gray, dimmed as overlays are.
  quiet = panel[panel.shape[0] // 2 - 2:panel.shape[0] // 2 + 2, 2:6]
  np.testing.assert_allclose(quiet, 128 / 255 * 0.5, atol=0.03)
  mean_image = np.mean([_image(s) for s in range(4)], axis=0)  # float pixel values
  with_image = figures.group_sum_figure(mean_image, summed)
  assert figures.save_figure(with_image, tmp_path / "group_image.png")


def test_bad_inputs_name_the_problem():
  image = _image()
  with pytest.raises(figures.FigureInputError, match="uint8"):
    figures.lesion_figure(None, image.astype(np.int32), _blob(1, 1), _blob(1, 1))
  with pytest.raises(figures.FigureInputError, match=r"\[0, 255\]"):
    figures.lesion_figure(None, image / 127.5 - 1, _blob(1, 1), _blob(1, 1))
  with pytest.raises(figures.FigureInputError, match="negative_map"):
    figures.lesion_figure(None, image, _blob(1, 1), _blob(1, 1, size=32))
  with pytest.raises(figures.FigureInputError, match="at least one"):
    figures.quantity_pair_figure(image, {})


def test_save_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "figs" / "a.png"
  fig = figures.group_sum_figure(None, _blob(10, 10))
  first = figures.save_figure(fig, path)
  assert first == str(path) and os.listdir(path.parent) == ["a.png"]
  assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
  old = path.read_bytes()
  assert old.startswith(b"\x89PNG")

  def failing_savefig(self, fname, **kwargs):
    fname.write(b"\x89PNG partial")
    raise RuntimeError("disk full")

  monkeypatch.setattr(Figure, "savefig", failing_savefig)
  with pytest.raises(RuntimeError, match="disk full"):
    figures.save_figure(fig, path)
  assert path.read_bytes() == old  # the old figure, untouched
  assert os.listdir(path.parent) == ["a.png"]  # no temporary file left
  with pytest.raises(RuntimeError):
    figures.save_figure(fig, tmp_path / "new" / "b.png")
  assert os.listdir(tmp_path / "new") == []


def test_import_uses_no_pyplot():
  code = ("import sys, drig.analysis.figures, drig.analysis.localization; "
          "bad = [m for m in ('matplotlib.pyplot', 'tensorflow') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def _blue(rgb):
  # Okabe & Ito's blue (0, 0.447, 0.698) at full intensity.
  return (rgb[..., 2] > 0.5) & (rgb[..., 0] < 0.2) & (rgb[..., 1] > 0.3) & (rgb[..., 1] < 0.6)


def _orange(rgb):
  # Okabe & Ito's orange (0.902, 0.624, 0) at full intensity.
  return (rgb[..., 0] > 0.75) & (rgb[..., 1] > 0.45) & (rgb[..., 1] < 0.8) & (rgb[..., 2] < 0.2)


@pytest.mark.parametrize("draw", ["lesion", "pair", "methods", "group"])
def test_colorblind_palette_draws_blue_for_and_orange_against(tmp_path, draw):
  image = _image()
  signed = _blob(20, 20) - _blob(44, 44)  # positive upper left, negative lower right

  def figure(palette):
    if draw == "lesion":
      fig = figures.lesion_figure(None, image, signed, signed, palette=palette)
      return fig, fig.axes[2]
    if draw == "pair":
      fig = figures.quantity_pair_figure(image, {"a": signed, "b": signed}, palette=palette)
    elif draw == "methods":
      fig = figures.methods_figure(image, {"a": signed}, palette=palette)
    else:
      fig = figures.group_sum_figure(image, signed, palette=palette)
    return fig, fig.axes[0]

  panels = {}
  for palette in ("poster", "colorblind"):
    fig, ax = figure(palette)
    panels[palette] = _panel(fig, ax, _save_and_read(fig, tmp_path, f"{draw}_{palette}.png"))
  poster, colorblind = panels["poster"], panels["colorblind"]
  assert poster.shape == colorblind.shape and not np.allclose(poster, colorblind)
  assert _green(poster).any() and _red(poster).any()
  assert not (_green(colorblind).any() or _red(colorblind).any())
  # Blue where the map is positive (upper left), orange where negative (lower right).
  blue, orange = _centre_of(_blue(colorblind)), _centre_of(_orange(colorblind))
  assert blue[0] < 0.5 and blue[1] < 0.5 and orange[0] > 0.5 and orange[1] > 0.5


def test_unknown_palette_is_named():
  with pytest.raises(ValueError, match="palette 'viridis'"):
    figures.group_sum_figure(None, _blob(10, 10), palette="viridis")


def test_vector_formats_are_written_beside_the_png(tmp_path):
  fig = figures.group_sum_figure(None, _blob(10, 10), title="group")
  path = figures.save_figure(fig, tmp_path / "g.png", formats=("png", "svg", "pdf"))
  assert sorted(os.listdir(tmp_path)) == ["g.pdf", "g.png", "g.svg"]
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "g.pdf").read_bytes().startswith(b"%PDF-")
  svg = (tmp_path / "g.svg").read_text()
  assert "<svg" in svg and "group" in svg  # the title is drawn in the vector file
  assert figures.vector_paths(path, ("svg", "png")) == [str(tmp_path / "g.svg")]
  # The PNG is written whatever the list: reports embed it.
  figures.save_figure(fig, tmp_path / "only.png", formats=("pdf",))
  assert (tmp_path / "only.png").exists() and (tmp_path / "only.pdf").exists()


@pytest.mark.parametrize("formats, message", [
    (("png", "jpg"), "format 'jpg'"), ("svg", "non-empty list"), ((), "non-empty list")])
def test_bad_figure_formats_are_refused_before_writing(tmp_path, formats, message):
  fig = figures.group_sum_figure(None, _blob(10, 10))
  with pytest.raises(ValueError, match=message):
    figures.save_figure(fig, tmp_path / "g.png", formats=formats)
  assert os.listdir(tmp_path) == []
