"""What drig's TFDS builders share while generating a data set.

* :func:`init_worker`: the initializer of generation worker processes.
* :func:`overrides_hash`: the name of a builder config with custom fields.
* :func:`fundus_features`: the features of fundus data sets with lesion masks
  (synthetic_fundus, IDRiD).
* :class:`ManualDownloadError`, :func:`check_manual_dir_exists`: a missing manual
  download, said with the download instructions.
* :class:`SourceFileCodePath`: a mixin that tells TFDS where a builder's code lives.
* :class:`PhotographBuilder`: the base of the builders that preprocess a folder of
  real photographs (EyePACS, IDRiD): a pool of spawned worker processes for the
  duration of generation, and the bad-image report (every photograph left out, with
  the file and the problem) written beside the data set as ``bad_images.json``
  (:func:`read_bad_image_report`).
"""

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping

import cv2
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from drig import grading
from drig import runtime
from drig.data import lesions
from drig.data import tf_runtime

BAD_IMAGE_REPORT = "bad_images.json"

_log = logging.getLogger(__name__)


def init_worker(keep_freed_memory: bool = True):
  """Worker initializer: OpenCV single-threaded, as one process per core fills them.

  ``keep_freed_memory``: glibc keeps freed buffers for the next photograph
  (``runtime.keep_freed_memory``: about 10% more photographs/s per worker).
  """
  cv2.setNumThreads(1)
  if keep_freed_memory:
    runtime.keep_freed_memory()


def overrides_hash(overrides: Mapping[str, Any]) -> str:
  """Short stable hash of a dict of config overrides (for custom config names)."""
  text = json.dumps({k: overrides[k] for k in sorted(overrides)}, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def fundus_features(size: int, photo_size: int, **extra) -> tfds.features.FeaturesDict:
  """The features of a data set of fundus photographs with lesion masks.

  ``name``, ``label`` (``extra`` may redefine it), ``image`` (the preprocessed
  ``size`` x ``size`` network input, PNG), ``photo`` (the photograph, JPEG) and one
  boolean ``size`` x ``size`` mask per lesion type (``lesions.MASK_NAMES``), then
  ``extra``.
  """
  return tfds.features.FeaturesDict({
      "name": tfds.features.Text(),
      "label": tfds.features.ClassLabel(num_classes=grading.NUM_GRADES),
      "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
      "photo": tfds.features.Image(shape=(photo_size, photo_size, 3), encoding_format="jpeg"),
      "masks": tfds.features.FeaturesDict({
          name: tfds.features.Tensor(shape=(size, size), dtype=np.bool_,
                                     encoding=tfds.features.Encoding.ZLIB)
          for name in lesions.MASK_NAMES}),
      **extra,
  })


class ManualDownloadError(FileNotFoundError):
  """The manual download is missing or incomplete; the message says what to get."""


def check_manual_dir_exists(manual_dir, dataset: str, instructions: str) -> str:
  """``manual_dir`` as a string, once it is known to be an existing directory.

  Raises:
    ManualDownloadError: no directory given, or it does not exist; the message
      names the data set and carries the download ``instructions``.
  """
  if not manual_dir:
    raise ManualDownloadError(
        f"No manual directory given for {dataset} (config.data.manual_dir or"
        f" DownloadConfig(manual_dir=...)).\n" + instructions)
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise ManualDownloadError(
        f"{dataset} manual directory {manual_dir} does not exist.\n" + instructions)
  return manual_dir


def read_bad_image_report(b: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The bad-image report written beside a data set that ``b`` prepared."""
  with open(os.path.join(b.data_dir, BAD_IMAGE_REPORT)) as f:
    return json.load(f)


class SourceFileCodePath:
  """Mixin: ``code_path`` is the file that defines the builder class.

  TFDS's default lookup needs the importlib_resources package for modules outside
  tensorflow_datasets; the answer is simply the defining module's file.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(sys.modules[cls.__module__].__file__)


class PhotographBuilder(SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
  """Base of the builders that decode and preprocess a manual download of photographs.

  Subclasses set ``DISPLAY_NAME``, start each split's report with
  :meth:`_start_report` (``listed``, ``written``, ``bad`` and ``warnings`` at
  least), process photographs with :meth:`_map` and may add fields to the data
  set's report (:meth:`_report_fields`) and to each split's log line
  (:meth:`_split_summary`).
  """

  DISPLAY_NAME = "photographs"

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """Creates the builder.

    Args:
      num_workers: processes that decode and preprocess photographs during
        generation; default ``os.cpu_count()``; 0 or 1 runs in this process.
        Worker processes are spawned, so a script that generates must guard its
        entry point with ``if __name__ == "__main__":``.
      **kwargs: ``tfds.core.DatasetBuilder`` arguments (``data_dir``,
        ``config``, ``file_format``, ...).
    """
    tf_runtime.import_tensorflow()
    self._num_workers = os.cpu_count() if num_workers is None else int(num_workers)
    self._reports: dict[str, dict[str, Any]] = {}
    self._pool = None
    self._num_bad = 0
    super().__init__(**kwargs)

  def _start_report(self, split: str, **fields) -> dict[str, Any]:
    """A new report for ``split``: listed/written counts, bad and warnings lists."""
    report = {"listed": 0, "written": 0, "bad": [], "warnings": [], **fields}
    self._reports[split] = report
    return report

  def _map(self, fn: Callable[[Any], Any], jobs: Iterable[Any], chunksize: int) -> Iterator[Any]:
    """``fn`` over ``jobs`` in order, on the worker pool during generation."""
    if self._pool is not None:
      return self._pool.map(fn, jobs, chunksize=chunksize)
    return map(fn, jobs)

  def _leave_out(self, report, split: str, name: str, filepath: str, problem: str) -> None:
    """Records a photograph left out of ``split``, with its file and the problem."""
    report["bad"].append({"name": name, "file": filepath, "problem": problem})
    _log.warning("%s %s: leaving out %s: %s", self.DISPLAY_NAME, split, filepath, problem)

  def _report_fields(self) -> dict[str, Any]:
    """Extra top-level fields of the data set's report."""
    return {}

  def _split_summary(self, report: dict[str, Any]) -> str:
    """The end of a split's log line after the written and bad counts."""
    return f"{len(report['warnings'])} warnings"

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._reports = {}
    if self._num_workers > 1:
      # spawn, not fork: this process holds TensorFlow's threads.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self._num_workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=init_worker)
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._pool is not None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
    report = {
        "dataset": f"{self.name}/{self.builder_config.name}/{self.version}",
        "manual_dir": os.fspath(dl_manager.manual_dir),
        "num_bad": sum(len(r["bad"]) for r in self._reports.values()),
        **self._report_fields(),
        "splits": {k: self._reports[k] for k in sorted(self._reports)},
    }
    # self.data_path is the temporary directory that TFDS renames into place.
    (self.data_path / BAD_IMAGE_REPORT).write_text(json.dumps(report, indent=1))
    for split, r in report["splits"].items():
      _log.info("%s %s: %d of %d photographs written, %d left out as bad, %s.",
                self.DISPLAY_NAME, split, r["written"], r["listed"], len(r["bad"]),
                self._split_summary(r))
    self._num_bad = report["num_bad"]

  def _post_download_and_prepare_hook(self):
    # Runs after TFDS moved the data set into place, so data_dir is final here.
    if self._num_bad:
      _log.warning("%s: %d photographs left out as bad; they are listed in %s.",
                   self.DISPLAY_NAME, self._num_bad,
                   os.path.join(self.data_dir, BAD_IMAGE_REPORT))
