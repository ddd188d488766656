"""Predicted vertebra ranges and boxes against a mask's (``labels.vertebra_extents``): IoUs."""
from __future__ import annotations

from typing import Iterable
from typing import Sequence

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.io import vertebrae as vertebrae_lib


def range_iou(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float:
  """IoU of two inclusive slice ranges (1.0 when both are absent, 0.0 when one is)."""
  if a is None or b is None:
    return float(a is None and b is None)
  inter = max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)
  union = (a[1] - a[0] + 1) + (b[1] - b[0] + 1) - inter
  return inter / union


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of two (x0, y0, x1, y1) boxes (same units)."""
  return float(labels_lib.box_iou(a, b))


def compare(pred: Sequence[vertebrae_lib.VertebraPrediction], mask: np.ndarray,
            numbers: np.ndarray) -> list[dict]:
  """Per vertebra: range IoU and box IoU (pixels) of a study's predictions against its mask."""
  return compare_extents(pred, labels_lib.vertebra_extents(mask), mask.shape, numbers)


def compare_extents(pred: Sequence[vertebrae_lib.VertebraPrediction],
                    truth: Sequence[labels_lib.VertebraExtent | None], shape: Sequence[int],
                    numbers: np.ndarray) -> list[dict]:
  """:func:`compare` against a mask's ``labels.vertebra_extents`` and (S, H, W) ``shape`` (for
  callers that keep many studies and not their masks)."""
  rows = []
  for v, (p, t) in enumerate(zip(pred, truth)):
    got = vertebrae_lib.resolve(p, numbers, shape)
    rows.append({
        "vertebra": labels_lib.VERTEBRAE[v], "range_iou": range_iou(
            None if got is None else got[:2], None if t is None else (t.first, t.last)),
        "box_iou": (box_iou(got[2], t.box)
                    if got is not None and t is not None else float(got is None and t is None))
    })
  return rows


def summarise(rows: Iterable[dict]) -> dict[str, float]:
  """Mean range and box IoU over (study, vertebra) rows."""
  rows = list(rows)
  if not rows:
    return {"pairs": 0, "range_iou": float("nan"), "box_iou": float("nan")}
  return {
      "pairs": len(rows), "range_iou": float(np.mean([r["range_iou"] for r in rows])),
      "box_iou": float(np.mean([r["box_iou"] for r in rows]))
  }


def oracle_outputs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """What a perfect stage-1 model would say about a study: mask presences and normalised boxes."""
  sl = labels_lib.slice_labels(mask)
  _, h, w = mask.shape
  return sl.presence.astype(np.float64), sl.box / np.array([w, h, w, h], np.float64)
