"""The shortcut probe: its features see what they should, and it is scored out of fold."""
import numpy as np
import pandas as pd

from cspine_jax import labels
from cspine_jax.train import probe


def _vertebra(cleft: bool, rng) -> np.ndarray:
  """A (8, 32, 32, 3) stage-2 sample: a bright ring of bone around a marrow core, optionally
  split by a dark cleft."""
  yy, xx = np.mgrid[:32, :32]
  r = np.hypot(yy - 16, xx - 16)
  image = np.where(r < 12, 140, 30).astype(np.float32)
  if cleft:
    image[(np.abs(xx - 16) < 2) & (r < 10)] = 40
  image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
  return np.repeat(np.repeat(image[None, ..., None], 3, -1), 8, 0)


def test_enclosed_dark_fraction_sees_a_cleft_inside_bone():
  rng = np.random.default_rng(0)
  whole, split = _vertebra(False, rng)[0, ..., 1], _vertebra(True, rng)[0, ..., 1]
  assert probe.enclosed_dark_fraction(whole) < 0.01
  assert probe.enclosed_dark_fraction(split) > 0.03
  assert probe.enclosed_dark_fraction(np.zeros((8, 8), np.uint8)) == 0.0


def test_probe_predicts_each_fold_from_the_others():
  rng = np.random.default_rng(1)
  rows = []
  for s in range(24):
    for v in range(labels.NUM_VERTEBRAE):
      cleft = bool(rng.random() < 0.3)
      rows.append({"StudyInstanceUID": f"1.2.{s}", "fold": s % 3, "vertebra": v,
                   "label": float(cleft), "present": True,
                   "x": probe.features(_vertebra(cleft, rng), v)})
  table = pd.DataFrame(rows)
  oof = probe.fit_out_of_fold(table, top_n=7)
  assert sorted(oof["fold"].unique()) == [0, 1, 2] and len(oof) == 24
  truth = table.pivot(index="StudyInstanceUID", columns="vertebra", values="label")
  pred = oof.set_index("StudyInstanceUID")[list(labels.VERTEBRAE)].loc[truth.index].to_numpy()
  y = truth.to_numpy()
  assert pred[y == 1].mean() > 0.8 and pred[y == 0].mean() < 0.2  # the cue is learnt
  p = pred
  np.testing.assert_allclose(oof.set_index("StudyInstanceUID").loc[truth.index, "patient_overall"],
                             1 - np.prod(1 - p, axis=1), rtol=1e-9)
