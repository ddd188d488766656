"""Figures for evaluation and training: reliability diagram, learning curves.

Matplotlib with the Agg backend (no display needed); each function writes one PNG and returns its
path.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cspine_jax import labels as labels_lib  # noqa: E402

# Keys of a training log line that are the x axis or bookkeeping, not curves.
_X_KEYS = ("step", "epoch")


def reliability_curve(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
  """Equal-width bins of predicted probability: mean prediction, observed rate, count per bin."""
  y = np.asarray(y, np.float64).ravel()
  p = np.asarray(p, np.float64).ravel()
  which = np.minimum((p * bins).astype(int), bins - 1)
  rows = []
  for b in range(bins):
    sel = which == b
    if sel.any():
      rows.append({"bin": b, "predicted": p[sel].mean(), "observed": y[sel].mean(),
                   "count": int(sel.sum())})
  return pd.DataFrame(rows)


def reliability_plot(labels: pd.DataFrame, predictions: pd.DataFrame, path: str | os.PathLike,
                     bins: int = 10, title: str = "Reliability") -> pathlib.Path:
  """Observed fracture rate against predicted probability, patient_overall and vertebrae pooled.

  ``labels`` and ``predictions`` are wide frames with the same studies in the same order.
  """
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
  groups = (("patient_overall", ["patient_overall"]), ("C1-C7 pooled", list(labels_lib.VERTEBRAE)))
  for ax, (name, cols) in zip(axes, groups):
    y = labels[cols].to_numpy(np.float64)
    p = predictions[cols].to_numpy(np.float64)
    curve = reliability_curve(y, p, bins)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    if len(curve):
      sizes = 20 + 180 * curve["count"] / curve["count"].max()
      ax.plot(curve["predicted"], curve["observed"], color="tab:blue", lw=1.5)
      ax.scatter(curve["predicted"], curve["observed"], s=sizes, color="tab:blue", zorder=3,
                 label="bins (size = count)")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.03, 1.03), xlabel="predicted probability",
           ylabel="observed rate",
           title=f"{name} (n={y.size})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
  fig.suptitle(title)
  return _save(fig, path)


def read_jsonl(path: str | os.PathLike) -> pd.DataFrame:
  """A JSON-lines log (one object per line; blank lines skipped) as a frame."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{path}: line {n} is not JSON: {e}") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{path}: line {n} is not a JSON object")
      rows.append(obj)
  return pd.DataFrame(rows)


# What a panel draws: the training loss (solid) and validation loss (dashed) on the left axis, the
# validation competition metric (dotted) on the right one; bookkeeping (grad norm, speed) is left out.
TRAIN_KEY, VAL_KEY = "loss", "val_loss"
SCORE_KEYS = ("val_competition_loss", "score")


def curve_columns(log: pd.DataFrame) -> tuple[str | None, list[str]]:
  """(x column or None, the curves drawn: train loss, val loss, the val metric) of a log frame."""
  x = next((k for k in _X_KEYS if k in log.columns), None)
  has = lambda c: c in log.columns and pd.api.types.is_numeric_dtype(log[c]) and log[c].notna().any()
  curves = [c for c in (TRAIN_KEY, VAL_KEY) if has(c)]
  score = next((c for c in SCORE_KEYS if has(c)), None)
  return x, curves + ([score] if score else [])


def _group(name: str) -> tuple[str, str]:
  """"stage2/fold_0" -> ("stage2", "fold_0"); a name without a fold part is its own group."""
  head, sep, tail = name.rpartition("/")
  return (head, tail) if sep and tail.startswith("fold") else (name, "")


def smooth(values: pd.Series, span: int | None = None) -> pd.Series:
  """Exponential moving average (bias-corrected, like TensorBoard's smoothing) of a loss curve;
  ``span`` None: a fifteenth of its points, between 1 (no smoothing) and 50."""
  if span is None:
    span = int(min(max(round(len(values) / 15), 1), 50))
  return values.ewm(span=span, adjust=True).mean()


# How each curve is drawn: (colour, line style, width, alpha, legend label).
_STYLES = {"raw": ("C0", "-", 0.8, 0.3, "train loss"),
           "smooth": ("C0", "-", 1.6, 1.0, "train loss (EMA)"),
           "val": ("C1", "--", 1.4, 1.0, "val loss"),
           "score": ("C2", ":", 1.6, 1.0, "val metric (right axis)")}
_MAX_COLUMNS = 4


def _draw(ax, log: pd.DataFrame, handles: dict[str, Any]) -> None:
  """One model's curves on ``ax``; its legend entries go to ``handles`` (one figure legend)."""
  x_col, curves = curve_columns(log)
  xs = log[x_col] if x_col else pd.Series(np.arange(len(log)), index=log.index)
  twin = None
  for c in curves:
    ok = log[c].notna()
    x, y = xs[ok], log[c][ok]
    if c == TRAIN_KEY:
      kinds = [("raw", y), ("smooth", smooth(y))]
    elif c == VAL_KEY:
      kinds = [("val", y)]
    else:
      if twin is None:
        twin = ax.twinx()
        twin.set_ylabel("val metric", fontsize=8)
        twin.tick_params(labelsize=7)
      kinds = [("score", y)]
    for kind, values in kinds:
      colour, ls, lw, alpha, label = _STYLES[kind]
      (line,) = (twin if kind == "score" else ax).plot(
          x, values, color=colour, ls=ls, lw=lw, alpha=alpha,
          marker="." if kind in ("val", "score") and ok.sum() < 30 else None)
      handles.setdefault(label, line)
  ax.set_xlabel(x_col or "log line", fontsize=8)
  ax.set_ylabel("loss", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3)


def learning_curves_figure(logs: Mapping[str, str | os.PathLike],
                           title: str = "Learning curves") -> plt.Figure:
  """One panel per model (a log: one fold's or one member's run), at most four to a row; the
  panels of one model name (``stage2/fold_0``, ``stage2/fold_0_member_1``, ...) stay together
  (a name with more than four starts and ends its own rows).

  Training loss raw and faint, its moving average (`smooth`) over it; validation loss dashed;
  validation metric dotted on a right axis. One legend for the figure, below the panels.
  """
  groups: dict[str, list[tuple[str, pd.DataFrame]]] = {}
  for name, log_path in logs.items():
    groups.setdefault(_group(name)[0], []).append((name, read_jsonl(log_path)))
  cols = min(max(len(logs), 1), _MAX_COLUMNS)
  rows: list[list[tuple[str, pd.DataFrame]]] = [[]]
  for members in groups.values():  # whole models side by side; one that wraps has its own rows
    if len(rows[-1]) + len(members) > cols and rows[-1]:
      rows.append([])
    for i in range(0, len(members), cols):
      if i:
        rows.append([])
      rows[-1].extend(members[i:i + cols])
    if len(members) > cols:
      rows.append([])
  rows = [row for row in rows if row] or [[]]
  fig = plt.figure(figsize=(3.6 * cols + 0.4, 2.7 * len(rows) + 0.9), layout="constrained")
  grid = fig.add_gridspec(len(rows), cols)
  handles: dict[str, Any] = {}
  for r, row in enumerate(rows):
    for c, (name, log) in enumerate(row):
      ax = fig.add_subplot(grid[r, c])
      _draw(ax, log, handles)
      ax.set_title(name, fontsize=9)
  if handles:
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=len(handles) if cols > 2 else 2, fontsize=8, frameon=False)
  fig.suptitle(title)
  return fig


def learning_curves(logs: Mapping[str, str | os.PathLike], path: str | os.PathLike,
                    title: str = "Learning curves") -> pathlib.Path:
  """`learning_curves_figure` written to ``path``."""
  return _save(learning_curves_figure(logs, title), path)


def table_figure(df: pd.DataFrame, path: str | os.PathLike, title: str = "") -> pathlib.Path:
  """A table as a picture (for PNG run summaries); floats with 4 decimals."""
  text = df.map(lambda v: f"{v:.4f}" if isinstance(v, float) and np.isfinite(v) else
                ("-" if isinstance(v, float) else str(v)))
  fig, ax = plt.subplots(figsize=(1.6 * len(df.columns) + 1, 0.4 * len(df) + 1))
  ax.axis("off")
  table = ax.table(cellText=text.to_numpy(), colLabels=list(df.columns), loc="center")
  table.auto_set_font_size(False)
  table.set_fontsize(9)
  table.scale(1, 1.3)
  if title:
    ax.set_title(title)
  return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if fig.get_layout_engine() is None:
    fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
