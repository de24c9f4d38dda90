"""Procedural fundus photographs with exact per-lesion masks (numpy + OpenCV only).

One concept: the renderer of a synthetic fundus photograph and its masks.

``render_fundus(seed, grade)`` draws a camera-style colour fundus photograph of
diabetic-retinopathy grade 0-4 and returns it with one boolean mask per lesion
type (``drig.data.lesions.LESION_NAMES``) and the optic disc. What is drawn:

* the camera: an orange-red retina disc on black, of varied radius and offset,
  cut at the top and bottom in some photographs (a horizontal field stop), with
  an optional notch on the rim, vignetting, uneven illumination, a colour cast,
  gamma and sensor noise. JPEG compression happens in the data-set example
  (``drig.data.synthetic_examples.make_example``), so that the masks stay exact;
* the anatomy: choroidal texture, an optic disc with a cup, a darker macula
  with a foveal reflex, and a branching vessel tree (an artery and a vein in
  each of two temporal arcades around the macula and two nasal trunks, with
  two orders of random-walk branches);
* lesions by grade (the international clinical scale):

  | grade | lesions drawn |
  |---|---|
  | 0 | none |
  | 1 | 1-4 small microaneurysms |
  | 2 | microaneurysms, dot/blot/flame haemorrhages, hard-exudate clusters |
  | 3 | as 2 with haemorrhages in all four quadrants, venous beading, cotton-wool spots |
  | 4 | as 2/3, plus neovascularisation and/or a preretinal haemorrhage |

  ``REQUIRED_LESIONS[g]`` lists the types every grade-``g`` photograph shows;
  ``ALLOWED_LESIONS[g]`` the types it may show. Grade 0 against 1 hinges on
  1-4 microaneurysms of radius 0.8-1.5 % of the retina's radius (2-4 px across
  at a 256 px retina), of varied contrast, placed off the vessels. Dust
  shadows (blurred grey spots, no mask) appear in any grade as distractors.

Masks. A lesion mask is the exact support of that type's paint: every pixel
whose value the lesion changed is inside it (before JPEG), so the masks line up
with the photograph. Soft-edged lesions have their paint cut to zero below 2 %
opacity so that their support stays finite. ``render_fundus(...,
draw_lesions=False)`` renders the same photograph without lesions.

Determinism. Every random draw comes from a numpy ``Generator`` derived from the
seed, in four independent streams (scene, lesions, noise, camera), so turning
the lesions off changes nothing else. Data-set examples
(``drig.data.synthetic_examples``) derive their seed from ``(base_seed, split,
index)``, so an example does not depend on generation order or the number of
worker processes.

Lengths are fractions of the retina radius ``R`` so that any ``size`` gives the
same scene geometry. Speed: about 25 ms per 512 px photograph on one core of
the (shared, loaded) 2-core development machine. Paint is composited on
planar float32 RGB only where each layer's opacity is nonzero.
"""

import dataclasses
import functools
import math
import statistics
from typing import Any

import cv2
import numpy as np

from drig import grading
from drig.data import lesions

LESION_NAMES = lesions.LESION_NAMES
MASK_NAMES = lesions.MASK_NAMES

# Kaggle/EyePACS training-set grade counts; normalised, the default class mix.
KAGGLE_TRAIN_COUNTS = (25810, 2443, 5292, 873, 708)

REQUIRED_LESIONS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("microaneurysm",),
    2: ("microaneurysm", "haemorrhage", "hard_exudate"),
    3: ("microaneurysm", "haemorrhage", "venous_beading", "cotton_wool_spot"),
    4: ("microaneurysm", "haemorrhage"),
}
# Grade 4 also shows at least one of these.
PROLIFERATIVE_LESIONS = ("neovascularisation", "preretinal_haemorrhage")
ALLOWED_LESIONS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("microaneurysm",),
    2: ("microaneurysm", "haemorrhage", "hard_exudate"),
    3: ("microaneurysm", "haemorrhage", "hard_exudate", "venous_beading", "cotton_wool_spot"),
    4: LESION_NAMES,
}

# Paint below this opacity is dropped, so soft lesions have a finite support.
_MIN_ALPHA = 0.02
# Lesion centres stay inside this fraction of the retina radius: inside the
# 90 % field of view that preprocessing keeps.
_LESION_RADIUS = 0.8


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  """Knobs of ``render_fundus``; every range is sampled uniformly per image.

  Attributes:
    draw_lesions: False renders the same photograph without any lesion.
    retina_radius: retina radius as a fraction of the image size.
    max_offset: centre offset (x, y) as a fraction of the image size. Vertical
      offsets stay small: ``find_retina`` (Graham's rule) takes the middle row
      as the retina's centre row.
    crop_probability: chance that a horizontal field stop cuts the retina at
      the top and bottom.
    crop_half_height: half-height of that field stop, in units of R.
    notch_probability: chance of a small notch on the rim (as many cameras
      have).
    vignetting: brightness lost at the rim.
    exposure: overall brightness gain.
    noise_std: sensor-noise standard deviation in 8-bit levels.
    microaneurysm_radius: in units of R.
    microaneurysm_contrast: opacity of the dark red paint.
    dust_probability: chance of 1-3 blurred dust shadows (no mask; distractors).
  """
  draw_lesions: bool = True
  retina_radius: tuple[float, float] = (0.40, 0.485)
  max_offset: tuple[float, float] = (0.03, 0.012)
  crop_probability: float = 0.35
  crop_half_height: tuple[float, float] = (0.78, 0.95)
  notch_probability: float = 0.3
  vignetting: tuple[float, float] = (0.15, 0.5)
  exposure: tuple[float, float] = (0.6, 1.15)
  noise_std: tuple[float, float] = (1.0, 4.0)
  microaneurysm_radius: tuple[float, float] = (0.008, 0.015)
  microaneurysm_contrast: tuple[float, float] = (0.45, 0.85)
  dust_probability: float = 0.3


@dataclasses.dataclass
@dataclasses.dataclass
class _Vessel:
  points: np.ndarray  # float [n, 2] (x, y) pixels
  widths: np.ndarray  # float [n] pixels
  is_vein: bool
  order: int          # 0 trunk, 1 first branch, ...


@dataclasses.dataclass
class _Scene:
  size: int
  cx: float
  cy: float
  radius: float
  half_height: float  # visible |y - cy| (inf when not cropped)
  disc: tuple[float, float, float, float, float]  # x, y, rx, ry, angle (deg)
  macula: tuple[float, float]
  vessels: list[_Vessel]
  vessel_canvas: np.ndarray | None = None  # uint8 [S, S], for placing lesions


@dataclasses.dataclass
class _Layer:
  """Paint of one colour: opacity ``alpha`` on the box at (y0, x0) of its shape.

  ``name`` is the mask the paint belongs to ('' for anatomy); ``region`` an
  optional bool box (same place) that the mask also covers.
  """
  name: str
  colour: np.ndarray  # float32 [3]
  alpha: np.ndarray   # float32 [h, w], 0 outside the support
  y0: int
  x0: int
  region: np.ndarray | None = None

  @property
  def box(self) -> tuple[slice, slice]:
    return (slice(self.y0, self.y0 + self.alpha.shape[0]),
            slice(self.x0, self.x0 + self.alpha.shape[1]))


def _as_generators(rng_or_seed, n: int) -> list[np.random.Generator]:
  """Returns n independent generators derived from an int, SeedSequence or Generator."""
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed.spawn(n)
  if isinstance(rng_or_seed, np.random.SeedSequence):
    seq = rng_or_seed
  elif isinstance(rng_or_seed, (int, np.integer)):
    seq = np.random.SeedSequence(int(rng_or_seed))
  else:
    raise TypeError(f"rng_or_seed must be an int, SeedSequence or Generator, got "
                    f"{type(rng_or_seed).__name__}")
  return [np.random.default_rng(s) for s in seq.spawn(n)]


def _uniform(rng, bounds) -> float:
  return float(rng.uniform(bounds[0], bounds[1]))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates x [1, S] and y [S, 1] (broadcast, cheap)."""
  xs = np.arange(size, dtype=np.float32)[None, :]
  ys = np.arange(size, dtype=np.float32)[:, None]
  xs.flags.writeable = False
  ys.flags.writeable = False
  return xs, ys


# Standard normal quantiles at the centres of 256 equal-probability bins: a
# uniform random byte looked up here is (nearly) standard normal.
_NORMAL_QUANTILES = np.array(
    [statistics.NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)
_NORMAL_QUANTILES /= _NORMAL_QUANTILES.std()  # unit variance after binning

_SHIFT = 4  # cv2 drawing with 1/16 px sub-pixel precision.
_ONE = 1 << _SHIFT


def _fixed(points) -> np.ndarray:
  return np.rint(np.asarray(points, np.float64) * _ONE).astype(np.int32)


# ---------------------------------------------------------------------------
# Scene: camera geometry and anatomy.


def _make_scene(rng: np.random.Generator, size: int, opts: RenderOptions) -> _Scene:
  """Samples the retina's placement, the optic disc, the macula and the vessels."""
  radius = _uniform(rng, opts.retina_radius) * size
  # The retina never touches the left/right borders: the middle row must see
  # its whole diameter (real cameras crop at the top and bottom only).
  max_dx = max(0.0, min(opts.max_offset[0] * size, size / 2 - radius - 2))
  cx = size / 2 + _uniform(rng, (-max_dx, max_dx))
  cy = size / 2 + _uniform(rng, (-1, 1)) * opts.max_offset[1] * size
  half_height = math.inf
  if rng.random() < opts.crop_probability:
    half_height = _uniform(rng, opts.crop_half_height) * radius
  # Whatever falls outside the frame is cut too.
  half_height = min(half_height, cy, size - cy)

  side = 1.0 if rng.random() < 0.5 else -1.0  # +1: disc on the right (right eye)
  disc_x = cx + side * _uniform(rng, (0.42, 0.56)) * radius
  disc_y = cy + _uniform(rng, (-0.08, 0.06)) * radius
  disc_r = _uniform(rng, (0.11, 0.145)) * radius
  disc = (disc_x, disc_y, disc_r * _uniform(rng, (0.88, 1.0)), disc_r,
          _uniform(rng, (-15, 15)))
  macula = (cx - side * _uniform(rng, (0.1, 0.2)) * radius,
            disc_y + _uniform(rng, (0.03, 0.12)) * radius)
  scene = _Scene(size=size, cx=cx, cy=cy, radius=radius, half_height=half_height,
                 disc=disc, macula=macula, vessels=[])
  scene.vessels = _vessel_tree(rng, scene, side)
  return scene


def _first_bad(points: np.ndarray, scene: _Scene, n_max: np.ndarray) -> np.ndarray:
  """Per path [B, n, 2]: how many leading points stay in the retina, out of the fovea."""
  x, y = points[..., 0], points[..., 1]
  bad = np.hypot(x - scene.cx, y - scene.cy) > 0.985 * scene.radius
  bad |= np.hypot(x - scene.macula[0], y - scene.macula[1]) < 0.07 * scene.radius
  bad |= np.arange(points.shape[1])[None, :] >= n_max[:, None]
  bad[:, 0] = False
  return np.where(bad.any(1), bad.argmax(1), points.shape[1])


def _walks(rng, starts, headings, lengths, step: float, turn_sd: float, scene: _Scene
           ) -> list[np.ndarray]:
  """Random-walk vessel paths from ``starts`` [B, 2]; each cut where it leaves the retina."""
  starts = np.asarray(starts, np.float64).reshape(-1, 2)
  n_steps = np.maximum(2, (np.asarray(lengths) / step).astype(int))
  b, n = len(starts), int(n_steps.max())
  raw = rng.standard_normal((b, n + 4))
  # Smoothed turning (weights 1 2 3 2 1) gives gentle curves rather than zigzags,
  # plus a constant drift per path.
  turns = (raw[:, :-4] + 2 * raw[:, 1:-3] + 3 * raw[:, 2:-2] + 2 * raw[:, 3:-1] + raw[:, 4:])
  turns = turns * (turn_sd / 9 * 2.2) + rng.normal(0, turn_sd / 3, (b, 1))
  theta = np.asarray(headings, np.float64)[:, None] + np.cumsum(turns, 1)
  steps = step * np.stack([np.cos(theta), np.sin(theta)], -1)
  points = np.concatenate([starts[:, None], starts[:, None] + np.cumsum(steps, 1)], 1)
  keep = _first_bad(points, scene, n_steps + 1)
  return [points[i, :keep[i]] for i in range(b)]


def _arcade(rng, scene: _Scene, sigma: float, sweep: float, spread: float, step: float):
  """A temporal arcade: a widening spiral around the macula that starts at the disc."""
  mx, my = scene.macula
  dx, dy = scene.disc[0] - mx, scene.disc[1] - my
  rho0, phi0 = math.hypot(dx, dy), math.atan2(dy, dx)
  n = max(2, int(rho0 * sweep / step))
  t = np.linspace(0.0, 1.0, n)
  wiggle = np.convolve(rng.standard_normal(n + 4), np.array([1, 2, 3, 2, 1]) / 9, "valid")
  rho = rho0 * (1 + spread * t ** 1.5) * (1 + 0.02 * wiggle)
  phi = phi0 + sigma * sweep * t
  return np.stack([mx + rho * np.cos(phi), my + rho * np.sin(phi)], -1)


def _branch_points(rng, parents: list[_Vessel], spacing: tuple[float, float], first: tuple[
    float, float], radius: float):
  """Where branches leave their parents, for all parents at once.

  Branch points lie along each parent at ``first`` then every ``spacing`` (in
  units of R, uniform), stopping 0.05 R before its end.

  Returns:
    (parent index [B], point index in the parent [B]).
  """
  points = np.concatenate([p.points for p in parents])
  owner = np.repeat(np.arange(len(parents)), [len(p.points) for p in parents])
  seg = np.hypot(*np.diff(points, axis=0).T)
  seg[owner[1:] != owner[:-1]] = 0.0  # no length between one parent and the next
  arc = np.concatenate([[0.0], np.cumsum(seg)])  # global, non-decreasing
  begin = np.concatenate([[0], np.cumsum([len(p.points) for p in parents])])
  start_arc, end_arc = arc[begin[:-1]], arc[begin[1:] - 1]
  k = int((end_arc - start_arc).max() / (spacing[0] * radius)) + 1
  offsets = (rng.uniform(*first, (len(parents), 1))
             + np.cumsum(rng.uniform(*spacing, (len(parents), k)), 1) - spacing[0]) * radius
  ok = offsets < (end_arc - start_arc - 0.05 * radius)[:, None]
  which, _ = np.nonzero(ok)
  global_pos = (start_arc[:, None] + offsets)[ok]
  idx = np.searchsorted(arc, global_pos)
  idx = np.minimum(np.maximum(idx, begin[which] + 1), begin[which + 1] - 1)
  return which, idx - begin[which]


def _vessel_tree(rng, scene: _Scene, side: float) -> list[_Vessel]:
  """Two temporal arcades and two nasal trunks, each an artery and a vein, with branches."""
  radius = scene.radius
  step = 0.02 * radius
  vein_w = max(1.0, _uniform(rng, (0.017, 0.023)) * radius)
  artery_w = vein_w * _uniform(rng, (0.68, 0.8))
  paths, widths, veins = [], [], []
  nasal_headings, nasal_lengths, nasal_w = [], [], []
  for up in (-1.0, 1.0):  # superior, inferior
    for is_vein, w in ((True, vein_w), (False, artery_w)):
      sweep = math.radians(_uniform(rng, (95, 135)))
      paths.append(_arcade(rng, scene, side * up, sweep, _uniform(rng, (-0.1, 0.3)), step))
      widths.append(w)
      veins.append(is_vein)
      nasal_headings.append(math.atan2(up * _uniform(rng, (0.5, 1.6)), side))
      nasal_lengths.append(_uniform(rng, (0.5, 0.9)) * radius)
      nasal_w.append(w * _uniform(rng, (0.7, 0.85)))
  paths = [p[:_first_bad(p[None], scene, np.array([len(p)]))[0]] for p in paths]
  paths += _walks(rng, [scene.disc[:2]] * 4, nasal_headings, nasal_lengths, step, 0.06, scene)
  vessels = [_Vessel(p, np.linspace(w, 0.55 * w, len(p)), v, 0)
             for p, w, v in zip(paths, widths + nasal_w, veins + veins) if len(p) >= 2]

  parents = vessels
  for order, first, spacing in ((1, (0.08, 0.2), (0.09, 0.2)), (2, (0.05, 0.15), (0.12, 0.3))):
    if not parents:
      break
    which, idx = _branch_points(rng, parents, spacing, first, radius)
    if not len(which):
      break
    n = len(which)
    at = np.stack([parents[p].points[i] for p, i in zip(which, idx)])
    before = np.stack([parents[p].points[i - 1] for p, i in zip(which, idx)])
    parent_w = np.array([parents[p].widths[i] for p, i in zip(which, idx)])
    d = at - before
    headings = (np.arctan2(d[:, 1], d[:, 0])
                + rng.choice([-1.0, 1.0], n) * rng.uniform(0.45, 1.2, n))
    lengths = rng.uniform(0.15, 0.4, n) * radius * 0.7 ** (order - 1)
    w0s = np.maximum(0.8, parent_w * rng.uniform(0.5, 0.78, n))
    children = []
    for p, w0, parent in zip(_walks(rng, at, headings, lengths, step, 0.09, scene), w0s, which):
      if len(p) >= 3:
        children.append(_Vessel(p, np.linspace(w0, max(0.7, 0.4 * w0), len(p)),
                                parents[parent].is_vein, order))
    vessels += children
    parents = children
  return vessels


def _draw_vessels(scene: _Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Paints veins and arteries (uint8 [S, S] each) as runs of constant integer width."""
  runs = ({}, {})  # (arteries, veins): thickness -> list of fixed-point polylines
  for vessel in scene.vessels:
    thick = np.maximum(1, np.rint(vessel.widths)).astype(np.int32)
    fixed = _fixed(vessel.points)
    cuts = np.flatnonzero(thick[1:] != thick[:-1]) + 1
    starts, ends = [0, *cuts.tolist()], [*cuts.tolist(), len(thick)]
    for start, end in zip(starts, ends):
      run = fixed[start:min(end + 1, len(fixed))]
      if len(run) >= 2:
        runs[vessel.is_vein].setdefault(int(thick[start]), []).append(run)
  canvases = (_canvas(size), _canvas(size))
  for canvas, by_thickness in zip(canvases, runs):
    for thickness, polylines in by_thickness.items():
      cv2.polylines(canvas, polylines, False, 255, thickness, cv2.LINE_AA, _SHIFT)
  arteries, veins = canvases
  return veins, arteries


# ---------------------------------------------------------------------------
# Lesions.


def _sample_positions(rng, scene: _Scene, n: int, *, max_r: float = _LESION_RADIUS,
                      angle: tuple[float, float] | None = None, avoid_vessels: bool = False,
                      disc_clearance: float = 1.5, margin: float = 0.0,
                      near: tuple[float, float, float] | None = None) -> np.ndarray:
  """Up to n lesion centres [k, 2] in the visible retina (k < n only if space runs out).

  Args:
    max_r: stay inside this fraction of the retina radius.
    angle: restrict to this range of polar angles about the retina centre.
    avoid_vessels: reject centres on a vessel.
    disc_clearance: keep out of this many disc radii around the optic disc.
    margin: extra distance (px) kept from the rim and the field stop.
    near: (x, y, r): sample in this disc instead of the whole retina.
  """
  if n <= 0:
    return np.zeros((0, 2))
  radius = scene.radius
  found = []
  for _ in range(8):
    m = 4 * n + 16
    if near is not None:
      a = rng.uniform(0, 2 * np.pi, m)
      r = near[2] * np.sqrt(rng.uniform(0, 1, m))
      x, y = near[0] + r * np.cos(a), near[1] + r * np.sin(a)
    else:
      lo, hi = angle if angle is not None else (0.0, 2 * np.pi)
      a = rng.uniform(lo, hi, m)
      r = (max_r * radius - margin) * np.sqrt(rng.uniform(0.0, 1.0, m))
      x, y = scene.cx + r * np.cos(a), scene.cy + r * np.sin(a)
    ok = np.hypot(x - scene.cx, y - scene.cy) < max_r * radius - margin
    ok &= np.abs(y - scene.cy) < scene.half_height - 0.04 * radius - margin
    ok &= np.hypot(x - scene.disc[0], y - scene.disc[1]) > disc_clearance * scene.disc[3]
    ok &= (x >= 0) & (x < scene.size - 1) & (y >= 0) & (y < scene.size - 1)
    if avoid_vessels and scene.vessel_canvas is not None:
      xi = np.minimum(np.maximum(np.rint(x).astype(int), 0), scene.size - 1)
      yi = np.minimum(np.maximum(np.rint(y).astype(int), 0), scene.size - 1)
      ok &= scene.vessel_canvas[yi, xi] < 13
    found.extend(zip(x[ok], y[ok]))
    if len(found) >= n:
      break
  return np.asarray(found[:n], np.float64).reshape(-1, 2)


@dataclasses.dataclass
class _LesionPlan:
  microaneurysms: int = 0
  haemorrhages_per_quadrant: tuple[int, ...] | None = None
  haemorrhages: int = 0
  exudate_clusters: int = 0
  beading_segments: int = 0
  cotton_wool_spots: int = 0
  neovascular_patches: int = 0
  preretinal: int = 0


def _plan(rng, grade: int) -> _LesionPlan:
  """How many lesions of each type a photograph of this grade shows."""
  plan = _LesionPlan()
  if grade == 1:
    plan.microaneurysms = int(rng.integers(1, 5))
  elif grade == 2:
    plan.microaneurysms = int(rng.integers(2, 13))
    plan.haemorrhages = int(rng.integers(1, 9))
    plan.exudate_clusters = int(rng.integers(1, 4))
  elif grade == 3:
    plan.microaneurysms = int(rng.integers(5, 21))
    plan.haemorrhages_per_quadrant = tuple(int(v) for v in rng.integers(4, 11, 4))
    plan.exudate_clusters = int(rng.integers(0, 4))
    plan.beading_segments = int(rng.integers(1, 4))
    plan.cotton_wool_spots = int(rng.integers(2, 7))
  elif grade == 4:
    plan.microaneurysms = int(rng.integers(3, 16))
    if rng.random() < 0.5:
      plan.haemorrhages_per_quadrant = tuple(int(v) for v in rng.integers(2, 8, 4))
    else:
      plan.haemorrhages = int(rng.integers(2, 10))
    plan.exudate_clusters = int(rng.integers(0, 4))
    plan.beading_segments = int(rng.integers(0, 3))
    plan.cotton_wool_spots = int(rng.integers(0, 5))
    kind = rng.random()
    plan.neovascular_patches = int(rng.integers(1, 4)) if kind < 0.75 else 0
    plan.preretinal = int(rng.integers(1, 3)) if kind >= 0.5 else 0
  elif grade != 0:
    raise ValueError(f"grade must be 0-4, got {grade}")
  return plan


def _canvas(size: int) -> np.ndarray:
  return np.zeros((size, size), np.uint8)


def _layer(name: str, colour, canvas: np.ndarray, blur_sigma: float = 0.0,
           region: np.ndarray | None = None) -> _Layer | None:
  """uint8 paint -> a layer of float opacity in [0, 1], optionally softened.

  Works on the paint's bounding box (plus the blur's reach); opacity below
  ``_MIN_ALPHA`` is cut to zero so that soft paint has a finite support.
  Returns None when nothing was painted.
  """
  x, y, w, h = cv2.boundingRect(canvas if region is None else np.maximum(canvas, region))
  if w == 0 or h == 0:
    return None
  pad = int(math.ceil(3 * blur_sigma)) + 1
  size = canvas.shape[0]
  y0, x0 = max(0, y - pad), max(0, x - pad)
  y1, x1 = min(size, y + h + pad), min(size, x + w + pad)
  alpha = canvas[y0:y1, x0:x1].astype(np.float32) * (1 / 255)
  if blur_sigma > 0:
    alpha = cv2.GaussianBlur(alpha, (0, 0), blur_sigma)
  alpha[alpha < _MIN_ALPHA] = 0.0
  box_region = None if region is None else region[y0:y1, x0:x1] > 0
  return _Layer(name, np.asarray(colour, np.float32), alpha, y0, x0, box_region)


def _draw_lesions(rng, scene: _Scene, grade: int, opts: RenderOptions,
                  vein_colour: np.ndarray) -> list[_Layer]:
  """Paints this grade's lesions; returns their layers in painting order."""
  size, radius = scene.size, scene.radius
  plan = _plan(rng, grade)
  layers = []

  def circle(canvas, x, y, r, value):
    cv2.circle(canvas, tuple(_fixed([x, y])), max(1, int(round(r * _ONE))), int(value), -1,
               cv2.LINE_AA, _SHIFT)

  def ellipse(canvas, x, y, a, b, angle, value):
    cv2.ellipse(canvas, tuple(_fixed([x, y])), (max(1, int(round(a * _ONE))),
                                                max(1, int(round(b * _ONE)))),
                float(angle), 0, 360, int(value), -1, cv2.LINE_AA, _SHIFT)

  # Haemorrhages: dots, blots (a few overlapping ellipses) and flames (along
  # the nerve fibres, i.e. pointing away from the disc).
  if plan.haemorrhages or plan.haemorrhages_per_quadrant:
    if plan.haemorrhages_per_quadrant:
      centres = np.concatenate([
          _sample_positions(rng, scene, k, angle=(q * np.pi / 2, (q + 1) * np.pi / 2),
                            margin=0.05 * radius)
          for q, k in enumerate(plan.haemorrhages_per_quadrant)])
    else:
      centres = _sample_positions(rng, scene, plan.haemorrhages, margin=0.05 * radius)
    canvas = _canvas(size)
    n = len(centres)
    values, kinds = 255 * rng.uniform(0.6, 0.95, n), rng.random(n)
    sizes = rng.uniform(0, 1, (n, 4, 5))
    for (x, y), value, kind, u in zip(centres, values, kinds, sizes):
      if kind < 0.35:  # dot
        circle(canvas, x, y, (0.014 + 0.011 * u[0, 0]) * radius, value)
      elif kind < 0.75:  # blot
        for j in range(2 + int(3 * u[0, 4])):
          ellipse(canvas, x + (u[j, 0] - 0.5) * 0.03 * radius, y + (u[j, 1] - 0.5) * 0.03 * radius,
                  (0.015 + 0.02 * u[j, 2]) * radius, (0.012 + 0.016 * u[j, 3]) * radius,
                  180 * u[j, 4], value)
      else:  # flame
        angle = math.degrees(math.atan2(y - scene.disc[1], x - scene.disc[0]))
        ellipse(canvas, x, y, (0.03 + 0.03 * u[0, 0]) * radius, (0.008 + 0.008 * u[0, 1]) * radius,
                angle + 20 * (u[0, 2] - 0.5), value)
    layers.append(_layer("haemorrhage", np.array([105, 18, 12]) * _uniform(rng, (0.8, 1.2)),
                         canvas, 0.6))

  # Microaneurysms: tiny round dark-red dots, off the vessels.
  if plan.microaneurysms:
    centres = _sample_positions(rng, scene, plan.microaneurysms, avoid_vessels=True,
                                margin=0.03 * radius)
    canvas = _canvas(size)
    radii = np.maximum(0.9, rng.uniform(*opts.microaneurysm_radius, len(centres)) * radius)
    values = 255 * rng.uniform(*opts.microaneurysm_contrast, len(centres))
    for (x, y), r, value in zip(centres, radii, values):
      circle(canvas, x, y, r, value)
    layers.append(_layer("microaneurysm", np.array([95, 15, 12]) * _uniform(rng, (0.8, 1.2)),
                         canvas, 0.45))

  # Hard exudates: clusters or partial rings (circinate) of small sharp yellow spots.
  if plan.exudate_clusters:
    canvas = _canvas(size)
    centres = _sample_positions(rng, scene, plan.exudate_clusters, max_r=0.65,
                                margin=0.08 * radius)
    for x, y in centres:
      k = int(rng.integers(4, 26))
      spread = _uniform(rng, (0.025, 0.07)) * radius
      if rng.random() < 0.3:  # circinate
        a = rng.uniform(0, 2 * np.pi, k)
        r = spread * rng.uniform(0.8, 1.2, k)
        px, py = x + r * np.cos(a), y + r * np.sin(a)
      else:
        px, py = x + rng.normal(0, spread / 2, k), y + rng.normal(0, spread / 2, k)
      axes = np.maximum(0.7, rng.uniform(0.004, 0.012, (k, 2)) * radius)
      angles, values = rng.uniform(0, 180, k), 255 * rng.uniform(0.6, 1.0, k)
      inside = np.hypot(px - scene.cx, py - scene.cy) < 0.82 * radius
      for sx, sy, (a, b), angle, value in zip(px[inside], py[inside], axes[inside],
                                              angles[inside], values[inside]):
        ellipse(canvas, sx, sy, a, b, angle, value)
    layers.append(_layer("hard_exudate", np.array([250, 225, 110]) * _uniform(rng, (0.85, 1.05)),
                         canvas, 0.5))

  # Cotton-wool spots: soft, fluffy, greyish-white; near the disc and arcades.
  if plan.cotton_wool_spots:
    canvas = _canvas(size)
    near = (scene.disc[0] - 0.5 * (scene.disc[0] - scene.cx), scene.disc[1], 0.45 * radius)
    centres = _sample_positions(rng, scene, plan.cotton_wool_spots, near=near,
                                margin=0.06 * radius)
    if len(centres) < plan.cotton_wool_spots:
      centres = np.concatenate([centres, _sample_positions(
          rng, scene, plan.cotton_wool_spots - len(centres), margin=0.06 * radius)])
    for x, y in centres:
      value = 255 * _uniform(rng, (0.55, 0.85))
      for _ in range(int(rng.integers(1, 4))):
        ox, oy = rng.normal(0, 0.01 * radius, 2)
        ellipse(canvas, x + ox, y + oy, _uniform(rng, (0.02, 0.045)) * radius,
                _uniform(rng, (0.014, 0.03)) * radius, _uniform(rng, (0, 180)), value)
    layers.append(_layer("cotton_wool_spot", np.array([238, 228, 200]) * _uniform(rng, (0.9, 1.05)),
                         canvas, 0.012 * radius))

  # Venous beading: alternating swellings along a stretch of a vein.
  if plan.beading_segments:
    canvas = _canvas(size)
    veins = [v for v in scene.vessels if v.is_vein and v.order <= 1 and len(v.points) > 12]
    for v in [veins[i] for i in rng.permutation(len(veins))[:plan.beading_segments]]:
      arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(v.points, axis=0).T))])
      length = _uniform(rng, (0.15, 0.3)) * radius
      start = _uniform(rng, (0.15 * radius, max(0.15 * radius, arc[-1] - length)))
      position = start
      while position < min(start + length, arc[-1]):
        i = min(int(np.searchsorted(arc, position)), len(v.points) - 1)
        x, y = v.points[i]
        if (math.hypot(x - scene.cx, y - scene.cy) < 0.85 * radius
            and abs(y - scene.cy) < scene.half_height - 0.04 * radius):
          circle(canvas, x, y, max(1.0, v.widths[i] * _uniform(rng, (0.8, 1.05))), 255)
        position += max(2.0, v.widths[i] * _uniform(rng, (2.2, 3.0)))
    layers.append(_layer("venous_beading", vein_colour, canvas, 0.5))

  # Neovascularisation: tangles of fine loops at the disc (NVD) or on a vessel
  # (NVE). The mask covers the tangle: the loops and what they enclose.
  if plan.neovascular_patches:
    canvas, region = _canvas(size), _canvas(size)
    thickness = max(1, int(round(0.005 * radius)))
    for p in range(plan.neovascular_patches):
      if p == 0 and rng.random() < 0.5:  # at the disc
        a = rng.uniform(0, 2 * np.pi)
        d = scene.disc[3] * _uniform(rng, (0.5, 1.1))
        px, py = scene.disc[0] + d * math.cos(a), scene.disc[1] + d * math.sin(a)
        patch = _uniform(rng, (0.08, 0.13)) * radius
      else:  # elsewhere, on a vessel
        v = scene.vessels[int(rng.integers(len(scene.vessels)))]
        px, py = v.points[int(rng.integers(len(v.points)))]
        patch = _uniform(rng, (0.05, 0.09)) * radius
      # Keep the patch inside the visible field of view.
      dist = math.hypot(px - scene.cx, py - scene.cy)
      limit = 0.8 * radius - patch
      if dist > limit:
        px = scene.cx + (px - scene.cx) * limit / dist
        py = scene.cy + (py - scene.cy) * limit / dist
      top = max(0.0, scene.half_height - 0.05 * radius - patch)
      py = scene.cy + min(max(py - scene.cy, -top), top)
      t = np.linspace(0, 2 * np.pi, 18, endpoint=False)
      for _ in range(int(rng.integers(6, 16))):
        lx, ly = np.array([px, py]) + rng.normal(0, 0.4 * patch, 2)
        offset = math.hypot(lx - px, ly - py)
        if offset > 0.6 * patch:
          lx, ly = px + (lx - px) * 0.6 * patch / offset, py + (ly - py) * 0.6 * patch / offset
        r = _uniform(rng, (0.2, 0.4)) * patch * (1 + 0.35 * rng.uniform(-1, 1, t.size))
        loop = _fixed(np.stack([lx + r * np.cos(t), ly + r * np.sin(t)], -1))
        cv2.polylines(canvas, [loop], True, int(255 * _uniform(rng, (0.6, 0.9))), thickness,
                      cv2.LINE_AA, _SHIFT)
        cv2.fillPoly(region, [loop], 255, cv2.LINE_8, _SHIFT)
    layers.append(_layer("neovascularisation", np.array([120, 22, 18]), canvas, 0.4, region))

  # Preretinal haemorrhage: a boat shape with a flat top (the blood's fluid level).
  if plan.preretinal:
    canvas = _canvas(size)
    half_ellipse = cv2.ellipse2Poly((0, 0), (1000, 1000), 0, 0, 180, 10) / 1000.0
    for _ in range(plan.preretinal):
      width = _uniform(rng, (0.12, 0.24)) * radius
      height = width * _uniform(rng, (0.45, 0.75))
      near = (scene.disc[0] + (scene.cx - scene.disc[0]) * 0.3, scene.cy, 0.45 * radius)
      centres = _sample_positions(rng, scene, 1, near=near, margin=width, disc_clearance=1.2)
      if not len(centres):
        centres = _sample_positions(rng, scene, 1, margin=width, disc_clearance=1.2)
      for x, y in centres:
        top = y - 0.35 * height
        poly = np.stack([x + half_ellipse[:, 0] * width / 2, top + half_ellipse[:, 1] * height], -1)
        cv2.fillPoly(canvas, [_fixed(poly)], int(255 * _uniform(rng, (0.85, 0.97))),
                     cv2.LINE_AA, _SHIFT)
    layers.append(_layer("preretinal_haemorrhage",
                         np.array([150, 20, 12]) * _uniform(rng, (0.85, 1.1)), canvas, 0.6))
  return [layer for layer in layers if layer is not None]


# ---------------------------------------------------------------------------
# Composition.


def _texture(rng, size: int, amplitude_fine: float) -> np.ndarray:
  """Choroidal texture: 1 + smooth noise at two scales, float32 [size, size].

  Both scales are made at a quarter of the resolution and upsampled once.
  """
  small = max(8, size // 4)
  coarse = cv2.resize(rng.standard_normal((6, 6)).astype(np.float32), (small, small),
                      interpolation=cv2.INTER_CUBIC)
  fine = cv2.resize(rng.standard_normal((40, 40)).astype(np.float32), (small, small),
                    interpolation=cv2.INTER_CUBIC)
  field = 1.0 + 0.06 * coarse + amplitude_fine * fine
  return cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)


def _box_layer(name, colour, centre, half, fn, size) -> _Layer:
  """A layer whose opacity ``fn(dx [1, w], dy [h, 1])`` lives in a box around ``centre``."""
  x0, y0 = max(0, int(centre[0] - half)), max(0, int(centre[1] - half))
  x1, y1 = min(size, int(centre[0] + half) + 2), min(size, int(centre[1] + half) + 2)
  dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(centre[0])
  dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(centre[1])
  return _Layer(name, np.asarray(colour, np.float32), fn(dx, dy).astype(np.float32), y0, x0)


def _paint(planes: np.ndarray, layer: _Layer, gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Paints a layer over planar RGB ``planes`` [3, S*S] in place ("over" blending).

  The layer's colour is scaled by the camera's per-channel ``gain`` (blending
  is linear, so this equals applying the gain afterwards). Touches only the
  layer's support. Returns its pixel rows and columns.
  """
  size = int(math.isqrt(planes.shape[1]))
  iy, ix = np.nonzero(layer.alpha)
  alpha = layer.alpha[iy, ix]
  iy += layer.y0
  ix += layer.x0
  flat = iy * size + ix
  values = planes[:, flat]
  values += alpha * ((layer.colour * gain)[:, None] - values)
  planes[:, flat] = values
  return iy, ix


def render_fundus(rng_or_seed, grade: int, *, size: int = 512, **options: Any
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Renders a synthetic colour fundus photograph of a DR grade, with its masks.

  Args:
    rng_or_seed: int, ``np.random.SeedSequence`` or ``np.random.Generator``.
      Equal seeds give identical photographs (a Generator is advanced).
    grade: diabetic-retinopathy grade, 0 (none) to 4 (proliferative).
    size: height and width of the photograph in pixels.
    **options: fields of ``RenderOptions`` (e.g. ``draw_lesions=False``).

  Returns:
    photo: uint8 ``[size, size, 3]`` RGB, before JPEG compression.
    masks: ``MASK_NAMES`` -> bool ``[size, size]``: each lesion type's exact
      painted support, and the optic disc.

  Raises:
    ValueError: grade outside 0-4, or size below 32.
  """
  opts = RenderOptions(**options)
  grade = int(grade)
  if not 0 <= grade < grading.NUM_GRADES:
    raise ValueError(f"grade must be 0-4, got {grade}")
  if size < 32:
    raise ValueError(f"size must be at least 32 px, got {size}")
  scene_rng, lesion_rng, noise_rng, camera_rng = _as_generators(rng_or_seed, 4)
  scene = _make_scene(scene_rng, size, opts)
  xs, ys = _grid(size)
  radius = scene.radius

  # Background: pigment colour times choroidal texture and the macula's shade.
  pigment = _uniform(scene_rng, (0.0, 1.0))
  base = (np.array([238, 122, 58], np.float32) * (1 - pigment)
          + np.array([185, 72, 32], np.float32) * pigment)
  shade = _texture(scene_rng, size, _uniform(scene_rng, (0.0, 0.05)))
  mx, my = scene.macula
  sigma = 0.14 * radius
  depth = _uniform(scene_rng, (0.18, 0.35))
  macula = _box_layer("", 0, scene.macula, 3.5 * sigma,
                      lambda dx, dy: np.exp(-0.5 * (dx * dx + dy * dy) / sigma ** 2), size)
  shade[macula.box] *= 1.0 - depth * macula.alpha

  # Layers painted over the background, back to front: disc, cup, foveal
  # reflex, arteries, veins, then the lesions.
  dx, dy, rx, ry, angle = scene.disc
  c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))

  def disc_distance(u, v):
    return np.sqrt(((u * c + v * s) / rx) ** 2 + ((v * c - u * s) / ry) ** 2)

  cup = _uniform(scene_rng, (0.3, 0.6))
  disc_colour = np.array([250, 196, 140], np.float32) * _uniform(scene_rng, (0.9, 1.05))
  disc = _box_layer("", disc_colour, (dx, dy), ry + 3, lambda u, v: 0.9 * np.clip(
      (1.0 - disc_distance(u, v)) * (0.4 * ry) + 0.5, 0, 1), size)
  cup_layer = _box_layer("", (255, 240, 215), (dx, dy), ry + 3, lambda u, v: 0.8 * np.clip(
      (cup - disc_distance(u, v)) / 0.15, 0, 1), size)
  reflex = _uniform(scene_rng, (0.0, 0.25))
  reflex_layer = _box_layer("", (255, 255, 255), (mx, my), 0.1 * radius,
                            lambda u, v: reflex * np.exp(-25 * (u * u + v * v) / sigma ** 2), size)
  layers = [disc, cup_layer, reflex_layer]

  veins, arteries = _draw_vessels(scene, size)
  vein_colour = base * np.array([0.62, 0.3, 0.38], np.float32) * _uniform(scene_rng, (0.8, 1.0))
  artery_colour = base * np.array([0.85, 0.5, 0.55], np.float32)
  layers.append(_layer("", artery_colour, arteries, 0.5))
  layers.append(_layer("", vein_colour, veins, 0.5))
  scene.vessel_canvas = np.maximum(veins, arteries)

  # Lesions come from their own random stream. Without them, the rest of the
  # photograph is bit for bit the same.
  lesion_layers = _draw_lesions(lesion_rng, scene, grade, opts, vein_colour)
  # Exposure and colour cast: a gain per channel.
  gain = _uniform(camera_rng, opts.exposure) * camera_rng.uniform(0.9, 1.1, 3).astype(np.float32)
  planes = np.multiply(shade.reshape(1, -1), (base * gain)[:, None])  # [3, S*S]
  for layer in layers:
    if layer is not None:
      _paint(planes, layer, gain)
  masks = {name: np.zeros((size, size), bool) for name in MASK_NAMES}
  masks["optic_disc"][disc.box] = disc_distance(
      np.arange(disc.x0, disc.x0 + disc.alpha.shape[1], dtype=np.float32)[None] - dx,
      np.arange(disc.y0, disc.y0 + disc.alpha.shape[0], dtype=np.float32)[:, None] - dy) <= 1.0
  if opts.draw_lesions:
    for layer in lesion_layers:
      masks[layer.name][_paint(planes, layer, gain)] = True
      if layer.region is not None:
        masks[layer.name][layer.box] |= layer.region

  # Camera: field stop (circle, optional top/bottom cut and notch), vignetting,
  # uneven illumination and dust shadows.
  r2 = (xs - scene.cx) ** 2 + (ys - scene.cy) ** 2
  aperture = np.clip(radius + 0.5 - np.sqrt(r2), 0, 1)
  if math.isfinite(scene.half_height):
    aperture *= np.clip(scene.half_height + 0.5 - np.abs(ys - scene.cy), 0, 1)
  if camera_rng.random() < opts.notch_probability:
    a = (_uniform(camera_rng, (0.15, 0.5)) * camera_rng.choice([-1, 1])
         + camera_rng.choice([0, np.pi]))
    half = max(1.0, 0.025 * radius)
    nx, ny = scene.cx + (radius + half) * math.cos(a), scene.cy + (radius + half) * math.sin(a)
    box = (slice(max(0, int(ny - half)), int(ny + half) + 1),
           slice(max(0, int(nx - 2 * half)), int(nx + 2 * half) + 1))
    aperture[box] = np.maximum(aperture[box], 0.8)
  vignette = 1.0 - _uniform(camera_rng, opts.vignetting) * np.minimum(r2 * (1 / radius ** 2), 1)
  gx, gy = camera_rng.normal(0, 0.12, 2) / radius
  light = vignette * ((1.0 + gx * (xs - scene.cx)) + gy * (ys - scene.cy))
  light = aperture * np.clip(light, 0.2, 1.5)
  if scene_rng.random() < opts.dust_probability:
    dust = np.zeros((size, size), np.float32)
    for x, y in _sample_positions(scene_rng, scene, int(scene_rng.integers(1, 4)), max_r=0.9):
      cv2.circle(dust, (int(x), int(y)), max(1, int(_uniform(scene_rng, (0.02, 0.05)) * radius)),
                 _uniform(scene_rng, (0.1, 0.25)), -1)
    light *= 1.0 - cv2.GaussianBlur(dust, (0, 0), 0.02 * radius)
  planes *= light.reshape(1, -1)

  # Sensor noise: Gaussian, drawn as random bytes mapped through the normal
  # quantile function (one table lookup); then rounding with saturation, and
  # the camera's tone curve (a gamma, as a lookup table).
  noise_std = _uniform(noise_rng, opts.noise_std)
  noise_bytes = np.frombuffer(noise_rng.bytes(3 * size * size), np.uint8).reshape(3 * size, size)
  noise = cv2.LUT(noise_bytes, _NORMAL_QUANTILES * np.float32(noise_std))
  planes = cv2.add(planes.reshape(3 * size, size), noise, dtype=cv2.CV_8U)
  photo = cv2.merge(list(planes.reshape(3, size, size)))
  gamma = _uniform(camera_rng, (0.85, 1.2))
  lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
  return cv2.LUT(photo, lut), masks
