"""Tests for cspine_jax.metrics: the competition metric, its array form and the prediction formats."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from cspine_jax import metrics
from cspine_jax.labels import TARGETS

UIDS = ["1.2.3", "1.2.4", "1.2.5"]
Y = np.array([
    [1, 1, 0, 0, 0, 0, 0, 0],   # C1 fractured
    [0, 0, 0, 0, 0, 0, 0, 0],   # healthy
    [1, 0, 1, 0, 0, 0, 1, 1],   # C2, C6, C7 fractured
], np.float64)


def _wide(uids, values) -> pd.DataFrame:
  df = pd.DataFrame(np.asarray(values, np.float64), columns=list(TARGETS))
  df.insert(0, "StudyInstanceUID", list(uids))
  return df


def _long(wide: pd.DataFrame) -> pd.DataFrame:
  rows = [(f"{uid}_{t}", wide.loc[i, t]) for i, uid in enumerate(wide["StudyInstanceUID"])
          for t in TARGETS]
  return pd.DataFrame(rows, columns=["row_id", "fractured"])


LABELS = _wide(UIDS, Y)


def test_weights():
  np.testing.assert_array_equal(metrics.target_weights(Y[0]), [14, 2, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(metrics.target_weights(Y[1]), [7, 1, 1, 1, 1, 1, 1, 1])


def test_hand_computed_values():
  p = np.array([[0.7] * 8, [0.2] * 8, [0.9, 0.1, 0.5, 0.5, 0.5, 0.5, 0.6, 0.99]])
  def lo(x):
    return -math.log(x)

  study0 = (14 * lo(0.7) + 2 * lo(0.7) + 6 * lo(0.3)) / 22
  study1 = lo(0.8)  # all negative: the weights cancel
  study2 = (14 * lo(0.9) + 1 * lo(0.9) + 2 * lo(0.5) + 3 * lo(0.5) + 2 * lo(0.6)
            + 2 * lo(0.99)) / 24
  np.testing.assert_allclose(metrics.weighted_log_loss(Y, p), [study0, study1, study2], rtol=1e-12)
  per_study = metrics.per_study_loss(LABELS, _wide(UIDS, p))
  assert list(per_study.index) == UIDS
  np.testing.assert_allclose(per_study.to_numpy(), [study0, study1, study2], rtol=1e-12)
  assert metrics.competition_loss(LABELS, _wide(UIDS, p)) == pytest.approx(
      (study0 + study1 + study2) / 3, rel=1e-12)


def test_perfect_and_coin_flip():
  assert metrics.competition_loss(LABELS, _wide(UIDS, Y)) == pytest.approx(-math.log(1 - 1e-7))
  assert metrics.competition_loss(LABELS, _wide(UIDS, Y)) < 1e-6
  assert metrics.competition_loss(LABELS, _wide(UIDS, np.full((3, 8), 0.5))) == math.log(2)
  # A confident miss is clipped at eps, not infinite.
  worst = metrics.competition_loss(LABELS, _wide(UIDS, 1 - Y))
  assert worst == pytest.approx(-math.log(1e-7))
  assert metrics.competition_loss(LABELS, _wide(UIDS, 1 - Y), eps=1e-3) == pytest.approx(
      -math.log(1e-3))


def test_order_and_long_format_give_the_same_score():
  p = np.random.default_rng(0).uniform(size=(3, 8))
  wide = _wide(UIDS, p)
  score = metrics.competition_loss(LABELS, wide)
  assert metrics.competition_loss(LABELS, wide.iloc[::-1]) == score
  long = _long(wide).sample(frac=1.0, random_state=1)  # rows in any order
  assert metrics.competition_loss(LABELS, long) == score
  back = metrics.read_predictions(long)
  assert list(back.columns) == ["StudyInstanceUID", *TARGETS]
  np.testing.assert_array_equal(back.set_index("StudyInstanceUID").loc[UIDS].to_numpy(), p)


def test_read_predictions_from_csv_both_formats(tmp_path):
  p = np.random.default_rng(1).uniform(size=(3, 8))
  wide = _wide(UIDS, p)
  wide.to_csv(tmp_path / "wide.csv", index=False)
  _long(wide).to_csv(tmp_path / "long.csv", index=False)
  a = metrics.competition_loss(LABELS, tmp_path / "wide.csv")
  b = metrics.competition_loss(LABELS, metrics.read_predictions(tmp_path / "long.csv"))
  assert a == pytest.approx(b, rel=1e-12)
  with pytest.raises(metrics.PredictionError, match="nope.csv: cannot read CSV"):
    metrics.read_predictions(tmp_path / "nope.csv")


def test_array_form_runs_under_jax():
  p = np.random.default_rng(2).uniform(size=(3, 8))
  ref = metrics.weighted_log_loss(Y, p)
  out = jax.jit(metrics.weighted_log_loss)(jnp.asarray(Y, jnp.float32), jnp.asarray(p, jnp.float32))
  assert isinstance(out, jax.Array) and out.shape == (3,)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)
  # The same weighting on logits (what a training loss would use) matches the probability form.
  logits = jnp.log(p) - jnp.log1p(-p)
  bce = jnp.logaddexp(0.0, logits) - Y * logits
  np.testing.assert_allclose(np.asarray(metrics.weighted_mean(jnp.asarray(Y), bce)), ref, rtol=1e-5)
  grad = jax.grad(lambda q: metrics.weighted_log_loss(jnp.asarray(Y), q).mean())(jnp.asarray(p))
  assert np.all(np.isfinite(np.asarray(grad)))


def _err(predictions, message, labels=LABELS):
  with pytest.raises(metrics.PredictionError, match=message):
    metrics.competition_loss(labels, predictions)


def test_errors_wide():
  p = np.full((3, 8), 0.3)
  _err(_wide(UIDS[:2], p[:2]), r"1 labelled studies have no prediction, e\.g\. 1\.2\.5")
  _err(_wide(UIDS + ["9.9"], np.full((4, 8), 0.3)), r"1 studies are not in the labels, e\.g\. 9\.9")
  _err(_wide(UIDS, p).drop(columns=["C4"]), r"missing columns \['C4'\]")
  bad = _wide(UIDS, p)
  bad.loc[1, "C3"] = np.nan
  _err(bad, r"study 1\.2\.4 target C3 = nan is missing \(NaN\)")
  bad = _wide(UIDS, p)
  bad.loc[2, "patient_overall"] = 1.5
  _err(bad, r"study 1\.2\.5 target patient_overall = 1\.5 is not in \[0, 1\]")
  bad = _wide(UIDS, p)
  bad.loc[0, "C7"] = -0.01
  _err(bad, r"study 1\.2\.3 target C7 = -0\.01 is not in \[0, 1\]")
  bad = _wide(UIDS, p).astype({"C1": object})
  bad.loc[0, "C1"] = "high"
  _err(bad, r"study 1\.2\.3 target C1 = 'high' is not a finite number")
  _err(_wide([UIDS[0], UIDS[0], UIDS[2]], p), r"study 1\.2\.3 appears more than once")
  _err(_wide(["1.2.3", "../1.2.4", "1.2.5"], p), r"invalid StudyInstanceUID '\.\./1\.2\.4'")


def test_errors_long():
  long = _long(_wide(UIDS, np.full((3, 8), 0.3)))
  _err(long.drop(index=10), r"no row for 1\.2\.4_C2 \(study 1\.2\.4 target C2 missing\)")
  renamed = long.copy()
  renamed.loc[3, "row_id"] = "1.2.3_C8"
  _err(renamed, r"row_id '1\.2\.3_C8' is not <StudyInstanceUID>_<patient_overall\|C1\.\.C7>")
  _err(pd.concat([long, long.iloc[[5]]]), r"row_id 1\.2\.3_C5 appears more than once")
  nan = long.copy()
  nan.loc[0, "fractured"] = np.nan
  _err(nan, r"study 1\.2\.3 target patient_overall = nan is missing \(NaN\)")


def test_errors_in_labels_are_named():
  bad = LABELS.copy()
  bad.loc[0, "C1"] = np.nan
  with pytest.raises(metrics.PredictionError, match=r"labels: study 1\.2\.3 target C1"):
    metrics.competition_loss(bad, _wide(UIDS, np.full((3, 8), 0.3)))
