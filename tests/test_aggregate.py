"""Aggregation rules against hand-computed values."""
import numpy as np
import pytest

from cspine_jax import aggregate

P = np.array([0.1, 0.5, 0.2, 0.0, 0.3, 0.05, 0.4])


def test_top_n_hand_values():
  # Sorted: 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0.
  assert aggregate.top_n_overall(P, 1) == pytest.approx(0.5)
  assert aggregate.top_n_overall(P, 2) == pytest.approx(1 - 0.5 * 0.6)  # 0.70
  assert aggregate.top_n_overall(P, 3) == pytest.approx(1 - 0.5 * 0.6 * 0.7)  # 0.79
  full = 1 - 0.9 * 0.5 * 0.8 * 1.0 * 0.7 * 0.95 * 0.6
  assert aggregate.top_n_overall(P, 7) == pytest.approx(full)  # 0.85636
  assert aggregate.top_n_overall(P) == pytest.approx(0.85636)
  assert aggregate.max_overall(P) == pytest.approx(0.5)


def test_top_n_batched_and_monotone():
  batch = np.stack([P, np.zeros(7), np.ones(7) * 0.5])
  out = aggregate.top_n_overall(batch, 2)
  np.testing.assert_allclose(out, [0.7, 0.0, 0.75])
  values = [aggregate.top_n_overall(P, n) for n in range(1, 8)]
  assert all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("bad, n", [(np.ones(6) * 0.1, 3), (P, 0), (P, 8), (P + 1, 3)])
def test_top_n_rejects(bad, n):
  with pytest.raises(ValueError):
    aggregate.top_n_overall(bad, n)


def test_pool_slices_max_and_quantile():
  frac = np.zeros((5, 7))
  pres = np.zeros((5, 7))
  frac[:, 0] = [0.9, 0.1, 0.2, 0.3, 0.4]  # slice 0 high but does not show C1
  pres[1:5, 0] = 0.8
  frac[:, 1] = [0.0, 0.0, 0.6, 0.0, 0.0]
  pres[:, 1] = [0.1, 0.2, 0.3, 0.2, 0.1]  # never confident: the argmax slice (2) stands in
  out = aggregate.pool_slices(frac, pres)
  assert out[0] == pytest.approx(0.4)
  assert out[1] == pytest.approx(0.6)
  q = aggregate.pool_slices(frac, pres, method="quantile", quantile=0.5)
  assert q[0] == pytest.approx(np.median([0.1, 0.2, 0.3, 0.4]))  # 0.25
  with pytest.raises(ValueError, match="pooling"):
    aggregate.pool_slices(frac, pres, method="mean")
  with pytest.raises(ValueError, match="shape"):
    aggregate.pool_slices(frac, pres[:3])


def test_wide_and_long_format():
  uids = ["1.2.3", "1.2.4"]
  probs = np.stack([P, np.full(7, 0.25)])
  wide = aggregate.wide_frame(uids, probs, top_n=1)
  assert list(wide.columns) == (["StudyInstanceUID", "patient_overall"]
                                + [f"C{i}" for i in range(1, 8)])
  np.testing.assert_allclose(wide["patient_overall"], [0.5, 0.25])
  np.testing.assert_allclose(aggregate.with_top_n(wide, 7)["patient_overall"][1], 1 - 0.75 ** 7)
  long = aggregate.to_long(wide)
  assert list(long.columns) == ["row_id", "fractured"]
  assert len(long) == 16
  assert long["row_id"].tolist()[:3] == ["1.2.3_patient_overall", "1.2.3_C1", "1.2.3_C2"]
  assert long["row_id"].iloc[15] == "1.2.4_C7"
  assert long["fractured"].iloc[2] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="UID"):
    aggregate.wide_frame(["../x", "1.2"], probs)
  bad = wide.copy()
  bad.loc[0, "C3"] = 1.5
  with pytest.raises(ValueError, match="probabilities"):
    aggregate.to_long(bad)


def test_ensemble_mean():
  np.testing.assert_allclose(aggregate.ensemble_mean([np.array([0.2, 0.4]), np.array([0.4, 0.0])]),
                             [0.3, 0.2])
  with pytest.raises(ValueError):
    aggregate.ensemble_mean([])
  with pytest.raises(ValueError, match="shape"):
    aggregate.ensemble_mean([np.zeros(2), np.zeros(3)])
