"""Which images an analysis explains: the first N, a stratified sample, or images by condition.

``config.selection`` names the rule; the candidates are the split's first
``config.selection_pool`` images (0: the whole split) and ``config.num_images``
of them are chosen:

* ``"first"``: the first ``num_images`` (no candidate is read in advance).
* ``"stratified"`` or ``"stratified:grade"``: equal numbers per true grade.
* ``"stratified:lesion"``: equal numbers per lesion stratum, an image's
  stratum being the rarest lesion type it carries (rarest over the pool), or
  "none"; every lesion type is then represented, as far as the pool has it.
* ``"grade:K"``: images of true grade K; ``"predicted:K"``: predicted grade K;
  ``"correct:K"``: true and predicted grade K (the poster's Fig (a) shows
  correctly graded grade-4 images); ``"wrong:K"``: true grade K, predicted another;
  ``"lesion:NAME"``: images whose NAME mask is not empty.

A stratum with fewer candidates than its share gives what it has and the
others fill the remaining places. Within a stratum, and for the conditions,
candidates are taken in an order drawn from ``config.seed`` (not the first
ones), so the choice is deterministic in (rule, pool, seed). The chosen
indices are returned sorted, so shards follow the split's order.

The functions here are pure (numpy in, numpy out); ``drig.analysis.images``
reads the candidates and ``drig.analysis.job`` runs the forward pass that
conditions on predictions need.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from drig import grading

KINDS = ("first", "stratified", "grade", "predicted", "correct", "wrong", "lesion")
STRATA = ("grade", "lesion")
NO_LESION = "none"


class SelectionError(ValueError):
  """A selection rule that cannot be parsed, or candidates that do not fit it."""


class Selection(NamedTuple):
  """A parsed selection rule: kind (one of KINDS) and its argument (a grade, stratum or name)."""
  kind: str
  argument: object = None

  @property
  def needs_predictions(self) -> bool:
    """Whether the rule conditions on the model's predicted grades (a forward pass)."""
    return self.kind in ("predicted", "correct", "wrong")

  @property
  def needs_masks(self) -> bool:
    """Whether the rule reads the candidates' lesion masks."""
    return self.kind == "lesion" or (self.kind == "stratified" and self.argument == "lesion")

  @property
  def reads_candidates(self) -> bool:
    """Whether the candidates must be read before the analysis (every rule but "first")."""
    return self.kind != "first"


def parse_selection(spec: str, lesion_names: Optional[Sequence[str]] = None) -> Selection:
  """Parses ``config.selection`` (see the module docstring for the rules).

  Args:
    spec: e.g. "first", "stratified:lesion", "correct:4".
    lesion_names: if given, a "lesion:NAME" rule must name one of them.

  Returns:
    A Selection.

  Raises:
    SelectionError: naming the rule and what is allowed.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise SelectionError(f"selection must be a rule such as 'first', 'stratified' or "
                         f"'correct:4', got {spec!r}")
  kind, _, argument = spec.strip().partition(":")
  if kind not in KINDS:
    raise SelectionError(f"selection {spec!r}: unknown rule {kind!r}; rules: {', '.join(KINDS)}")
  if kind == "first":
    if argument:
      raise SelectionError(f"selection {spec!r}: 'first' takes no argument")
    return Selection("first")
  if kind == "stratified":
    stratum = argument or "grade"
    if stratum not in STRATA:
      raise SelectionError(f"selection {spec!r}: stratify by one of {', '.join(STRATA)}")
    return Selection("stratified", stratum)
  if kind == "lesion":
    if not argument or (lesion_names is not None and argument not in lesion_names):
      known = f"; masks: {', '.join(lesion_names)}" if lesion_names is not None else ""
      raise SelectionError(f"selection {spec!r}: 'lesion:NAME' needs a mask name{known}")
    return Selection("lesion", argument)
  if not argument.isdigit() or not 0 <= int(argument) < grading.NUM_GRADES:
    raise SelectionError(f"selection {spec!r}: {kind!r} needs a grade 0..{grading.NUM_GRADES - 1}, "
                         f"e.g. '{kind}:4'")
  return Selection(kind, int(argument))


def seeded_order(num_candidates: int, seed: int) -> np.ndarray:
  """A permutation of range(num_candidates) drawn from ``seed`` (the order candidates are taken)."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7])).permutation(
      int(num_candidates))


def allocate_equally(available: Sequence[int], total: int) -> np.ndarray:
  """Places per stratum: as equal as possible, none above what a stratum has.

  Water-filling: every stratum gets min(its size, level), the level being the
  largest that fits ``total``; places left over by the rounding go to the
  strata in order.

  Args:
    available: candidates per stratum (ints >= 0).
    total: places to fill; at most sum(available) are filled.

  Returns:
    int64 [len(available)], summing to min(total, sum(available)).
  """
  available = np.asarray(available, np.int64)
  total = min(int(total), int(available.sum()))
  counts = np.zeros_like(available)
  while counts.sum() < total:
    open_strata = np.flatnonzero(counts < available)
    share = max((total - int(counts.sum())) // len(open_strata), 1)
    for s in open_strata:
      if counts.sum() >= total:
        break
      counts[s] = min(available[s], counts[s] + share)
  return counts


def stratified_sample(strata: Sequence, num_images: int, seed: int) -> np.ndarray:
  """Equal numbers of candidates per stratum, in the seeded order within each.

  Args:
    strata: the stratum of each candidate (hashable values).
    num_images: how many to choose.
    seed: the order's seed (``seeded_order``).

  Returns:
    Sorted candidate indices, int64 [min(num_images, len(strata))].
  """
  strata = list(strata)
  order = seeded_order(len(strata), seed)
  names = sorted(set(strata), key=str)
  members = {name: [int(i) for i in order if strata[i] == name] for name in names}
  counts = allocate_equally([len(members[name]) for name in names], num_images)
  chosen = [i for name, count in zip(names, counts) for i in members[name][:count]]
  return np.array(sorted(chosen), np.int64)


def rarest_lesion_strata(presence, lesion_names: Sequence[str]) -> list[str]:
  """Each candidate's stratum: the rarest lesion type it carries, or NO_LESION.

  Args:
    presence: bool [N, T], whether candidate n carries lesion type t.
    lesion_names: the T type names.

  Returns:
    N stratum names; rarity is the count over the N candidates, ties broken
    by the order of lesion_names.
  """
  presence = np.asarray(presence, bool)
  if presence.ndim != 2 or presence.shape[1] != len(lesion_names):
    raise SelectionError(f"presence must be [candidates, {len(lesion_names)} lesion types], got "
                         f"shape {presence.shape}")
  frequency = presence.sum(axis=0)
  by_rarity = np.argsort(frequency, kind="stable")
  strata = []
  for row in presence:
    carried = [t for t in by_rarity if row[t]]
    strata.append(lesion_names[carried[0]] if carried else NO_LESION)
  return strata


def select(selection: Selection, num_images: int, *, labels, predictions=None,
           presence=None, lesion_names: Sequence[str] = (), seed: int = 0) -> np.ndarray:
  """The candidates a rule chooses.

  Args:
    selection: a parsed rule.
    num_images: how many to choose (>= 1).
    labels: int [N], the candidates' true grades (-1: unknown).
    predictions: int [N], the model's grades (rules on predictions only).
    presence: bool [N, T], lesion presence per type (lesion rules only).
    lesion_names: the T type names of ``presence``.
    seed: the order in which candidates are taken.

  Returns:
    Sorted candidate indices, int64, at most num_images (fewer when the pool
    has fewer that fit the rule; the caller says so).

  Raises:
    SelectionError: the rule needs predictions or masks that are not given.
  """
  labels = np.asarray(labels, np.int64)
  n = len(labels)
  if selection.kind == "first":
    return np.arange(min(num_images, n), dtype=np.int64)
  if selection.needs_predictions and predictions is None:
    raise SelectionError(f"selection {selection.kind}:{selection.argument} needs predictions")
  if selection.needs_masks and presence is None:
    raise SelectionError(f"selection {selection.kind}:{selection.argument} needs lesion masks; "
                         "the data set has none")
  if selection.kind == "stratified":
    if selection.argument == "grade":
      if (labels < 0).all():
        raise SelectionError("selection stratified:grade needs true grades; the images have none")
      return stratified_sample(labels.tolist(), num_images, seed)
    return stratified_sample(rarest_lesion_strata(presence, lesion_names), num_images, seed)
  if selection.kind == "grade":
    fits = labels == selection.argument
  elif selection.kind == "lesion":
    fits = np.asarray(presence, bool)[:, list(lesion_names).index(selection.argument)]
  else:
    predictions = np.asarray(predictions, np.int64)
    predicted = predictions == selection.argument
    fits = {"predicted": predicted,
            "correct": predicted & (labels == selection.argument),
            "wrong": ~predicted & (labels == selection.argument) & (predictions >= 0)
            }[selection.kind]
  order = seeded_order(n, seed)
  chosen = order[fits[order]][:num_images]
  return np.sort(chosen).astype(np.int64)


def describe(selection: Selection, chosen: int, pool: int) -> str:
  """One line for the report: the rule, how many it chose and from how many candidates."""
  rule = selection.kind if selection.argument is None else f"{selection.kind}:{selection.argument}"
  return f"selection {rule!r}: {chosen} of {pool} candidates"
