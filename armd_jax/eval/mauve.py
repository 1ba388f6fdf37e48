"""MAUVE under our evaluator: the divergence frontier between samples and held-out text.

Computed by the `mauve-text` package (`[eval]` extra) on features the caller gives, in
this library *our evaluator's* (`generative.sample_features`: the mean of its last hidden
states over a sample's tokens), with a bootstrap 95% interval over samples. Comparable
between samplers scored by one evaluator and reference set, never with published MAUVE
figures (GPT-2-large features).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from typing import Dict, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class MauveResult:
  """MAUVE of samples against reference text under our evaluator's features.

  `ci95` is a percentile bootstrap interval: both sets resampled with replacement and
  MAUVE recomputed (quantisation included) `num_bootstrap` times.
  """

  mauve: float
  ci95: Tuple[float, float]
  num_samples: int
  num_reference: int
  num_buckets: int
  num_bootstrap: int
  evaluator: str

  def as_dict(self) -> Dict[str, object]:
    """JSON-ready summary (keys prefixed `mauve`)."""
    return {"mauve": self.mauve, "mauve_ci95": list(self.ci95),
            "mauve_num_reference": self.num_reference, "mauve_num_buckets": self.num_buckets,
            "mauve_num_bootstrap": self.num_bootstrap,
            "mauve_features": f"mean last hidden state of {self.evaluator}"}

  def __str__(self) -> str:
    return (f"MAUVE under our evaluator {self.mauve:.3f} [95% CI {self.ci95[0]:.3f}, "
            f"{self.ci95[1]:.3f}] ({self.num_samples} samples vs {self.num_reference} "
            f"held-out, {self.num_buckets} buckets; not comparable to GPT-2-large MAUVE)")


@contextlib.contextmanager
def _without_faiss_size_warnings():
  """Drops faiss's C-level "WARNING clustering N points to K centroids" lines from stderr
  (MAUVE's n/10 buckets always have fewer than faiss's 39 points per centroid); any
  other stderr output is passed on."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
              if not line.startswith("WARNING clustering")]
      if kept:
        sys.stderr.write("".join(kept))


def frontier_area(curve: np.ndarray) -> float:
  """MAUVE from a divergence curve [M, 2] given in mixture-weight order (as
  `compute_mauve(...).divergence_curve`): the mean of the areas under y(x) and x(y).

  Along that order x never increases and y never decreases, so each area is integrated
  in the curve's own order. (mauve-text 0.4.0 re-sorts the points by coordinate with an
  unstable sort, so identical histograms, where the points tie at x = 1, can give 0.75
  instead of 1; elsewhere the two agree.)
  """
  x, y = np.asarray(curve, np.float64).T
  trapezoid = getattr(np, "trapezoid", None) or np.trapz
  return float(0.5 * (trapezoid(y[::-1], x[::-1]) + trapezoid(x, y)))


def _compute_mauve(p: np.ndarray, q: np.ndarray, num_buckets, seed: int):
  try:
    import mauve  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("MAUVE needs the mauve-text package: pip install -e '.[eval]'.") from e
  import faiss  # pylint: disable=import-outside-toplevel  (mauve-text's k-means)
  threads = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)  # a few hundred points: threads only add overhead (~10x)
  try:
    with _without_faiss_size_warnings():
      out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets,
                                seed=seed, verbose=False)
  finally:
    faiss.omp_set_num_threads(threads)
  return frontier_area(out.divergence_curve), int(out.num_buckets)


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, *, evaluator: str = "",
                num_bootstrap: int = 50, num_buckets="auto", seed: int = 0) -> MauveResult:
  """MAUVE of samples p [B, D] against reference q [M, D]: `mauve.compute_mauve`'s
  quantisation and divergence curve, its area by `frontier_area`.

  Args:
    p_features, q_features: e.g. `evaluator_features` of the samples and of held-out
      text of the same length.
    evaluator: named in the result.
    num_bootstrap: resamples for the 95% interval (0: the interval is the point).
    num_buckets: k-means clusters ('auto': min(B, M) / 10, at least 2).
    seed: k-means and bootstrap seed.
  Raises:
    ValueError: fewer than 2 rows in a set, or feature widths that differ.
  """
  p, q = np.asarray(p_features, np.float64), np.asarray(q_features, np.float64)
  if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1] or min(len(p), len(q)) < 2:
    raise ValueError(f"mauve_score: needs two [n >= 2, D] feature sets of one width, got "
                     f"{p.shape} and {q.shape}.")
  value, buckets = _compute_mauve(p, q, num_buckets, seed)
  rng = np.random.default_rng(seed)
  draws = [_compute_mauve(p[rng.integers(0, len(p), len(p))],
                          q[rng.integers(0, len(q), len(q))], num_buckets, seed)[0]
           for _ in range(num_bootstrap)]
  low, high = np.percentile(draws, [2.5, 97.5]) if draws else (value, value)
  return MauveResult(value, (float(low), float(high)), len(p), len(q), buckets,
                     num_bootstrap, evaluator)
