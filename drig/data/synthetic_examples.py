"""The synthetic data set's examples: class counts, seeds, image encoding, one example.

One concept: turning ``render_fundus``'s photograph into a data-set example
(pure functions shared by the TFDS builder and the tests). An example's seed
comes from ``(base_seed, split, index)`` only (``example_seed``), so it does not
depend on generation order or the number of worker processes; the photograph is
JPEG-compressed and preprocessed as a real one would be, and its masks follow
the same geometry.
"""

import dataclasses
import zlib
from typing import Any, Sequence

import cv2
import numpy as np

from drig import preprocess
from drig.data.lesions import MASK_NAMES
from drig.data.synthetic_fundus import render_fundus


def allocate_counts(total: int, weights: Sequence[float], min_count: int = 0) -> np.ndarray:
  """Splits ``total`` into integer class counts proportional to ``weights``.

  Largest-remainder rounding: each class gets the floor of its exact share,
  then the classes with the largest remainders get one more (ties to the lower
  class). Classes below ``min_count`` are raised to it, taking examples one at
  a time from the class that stays largest relative to its exact share.

  Args:
    total: number of examples.
    weights: nonnegative class weights (counts or proportions).
    min_count: least count per class; needs ``total >= min_count * len(weights)``.

  Returns:
    int64 ``[len(weights)]`` summing to ``total``.
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 1 or (weights < 0).any() or weights.sum() <= 0:
    raise ValueError(f"weights must be nonnegative and not all zero, got {weights.tolist()}")
  if total < min_count * len(weights):
    raise ValueError(f"cannot give {len(weights)} classes at least {min_count} of {total} examples")
  exact = total * weights / weights.sum()
  counts = np.floor(exact).astype(np.int64)
  remainder = exact - counts
  order = np.lexsort((np.arange(len(weights)), -remainder))
  counts[order[:total - counts.sum()]] += 1
  while (counts < min_count).any():
    needy = int(np.argmax(counts < min_count))
    donors = np.where(counts > min_count)[0]
    donor = donors[np.argmax(counts[donors] - exact[donors])]
    counts[donor] -= 1
    counts[needy] += 1
  return counts


def split_id(split: str) -> int:
  """Stable integer id of a split name (crc32), for seeding."""
  return zlib.crc32(split.encode("utf-8"))


_PURPOSE_LABELS, _PURPOSE_EXAMPLE = 1, 2


def split_labels(seed: int, split: str, counts: Sequence[int]) -> np.ndarray:
  """The grades of a split's examples in order: ``counts[g]`` of grade g, shuffled.

  Deterministic from (seed, split); int64 ``[sum(counts)]``.
  """
  labels = np.repeat(np.arange(len(counts)), counts)
  rng = np.random.default_rng(np.random.SeedSequence([seed, split_id(split), _PURPOSE_LABELS]))
  return rng.permutation(labels)


def example_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
  """Seed of one example, from (base seed, split, index) only."""
  return np.random.SeedSequence([seed, split_id(split), _PURPOSE_EXAMPLE, index])


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
  """PNG bytes of a uint8 ``[H, W]``, ``[H, W, 1]`` or RGB ``[H, W, 3]`` array.

  Level 1 is the default: on preprocessed 256 px images it encodes about 7x
  faster than level 6 for 8 % more bytes.
  """
  if image.ndim == 3 and image.shape[-1] == 3:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression])
  if not ok:
    raise RuntimeError("OpenCV could not encode a PNG")
  return buf.tobytes()


def encode_jpeg(photo: np.ndarray, quality: int) -> bytes:
  """JPEG bytes of a uint8 RGB ``[H, W, 3]`` array (4:2:0 chroma, as cameras write)."""
  ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR),
                         [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise RuntimeError("OpenCV could not encode a JPEG")
  return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
  """Decodes PNG/JPEG bytes to uint8 RGB ``[H, W, 3]`` (or ``[H, W]`` for gray)."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise ValueError("could not decode image bytes")
  if image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  return image


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What ``make_example`` needs to build one data-set example (picklable)."""
  seed: int
  photo_size: int = 512
  image_size: int = 256
  jpeg_quality: tuple[int, int] = (72, 95)
  render_options: tuple[tuple[str, Any], ...] = ()
  preprocess_options: tuple[tuple[str, Any], ...] = ()


def make_example(spec: ExampleSpec, split: str, index: int, grade: int, *,
                 encode: bool = True, **render_overrides: Any) -> dict[str, Any]:
  """Renders, compresses and preprocesses one example of the synthetic data set.

  The photograph is JPEG-compressed at a quality drawn from
  ``spec.jpeg_quality``; the model input ``image`` is ``drig.preprocess``'s
  ``preprocess_fundus`` of the decoded JPEG, and every mask goes through the
  same geometry (``find_retina`` on the decoded photograph, then
  ``rescale_mask_to_retina``: an input pixel is in the mask when any photograph
  pixel under it is, so that no microaneurysm of one or two pixels vanishes)
  and is cleared outside the field of view.

  Args:
    spec: the data set's rendering settings.
    split: split name (part of the seed and the example name).
    index: example index in the split.
    grade: the example's DR grade.
    encode: True: ``image`` as PNG bytes (what TFDS stores); False: as a uint8
      ``[S, S, 3]`` array.
    **render_overrides: extra ``RenderOptions`` (e.g. ``draw_lesions=False``).

  Returns:
    dict with ``name`` (str), ``label`` (int), ``image``, ``photo`` (JPEG
    bytes) and ``masks`` (``MASK_NAMES`` -> bool ``[S, S]``).
  """

  seq = example_seed(spec.seed, split, index)
  render_seq, jpeg_seq = seq.spawn(2)
  options = dict(spec.render_options)
  options.update(render_overrides)
  photo, masks = render_fundus(render_seq, grade, size=spec.photo_size, **options)
  quality = int(np.random.default_rng(jpeg_seq).integers(spec.jpeg_quality[0],
                                                         spec.jpeg_quality[1] + 1))
  jpeg = encode_jpeg(photo, quality)
  decoded = decode_image(jpeg)
  size = spec.image_size
  image, geometry = preprocess.preprocess_fundus_with_geometry(
      decoded, size, **dict(spec.preprocess_options))
  fov = preprocess.field_of_view(size)
  out_masks = {}
  for name in MASK_NAMES:
    out_masks[name] = preprocess.rescale_mask_to_retina(masks[name], geometry, size=size) & fov
  return {
      "name": f"{split}_{index:06d}",
      "label": int(grade),
      "image": encode_png(image) if encode else image,
      "photo": jpeg,
      "masks": out_masks,
  }


def make_example_task(args: tuple[ExampleSpec, str, int, int]) -> dict[str, Any]:
  """``make_example`` on a tuple, for ``multiprocessing.Pool.imap``."""
  spec, split, index, grade = args
  return make_example(spec, split, index, grade)
