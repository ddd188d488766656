"""Run summary: one self-contained HTML page (learning curves, tables, per-study pictures).

Pictures are embedded as base64 PNGs, so the page can be copied or mailed on its own.
"""
from __future__ import annotations

import base64
import html
import os
import pathlib
from typing import Mapping
from typing import Sequence

import pandas as pd

from cspine_jax.io import files
from cspine_jax.report import plots


def find_logs(run_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Every ``log.jsonl`` under a run folder, named by its folder (e.g. ``stage2/fold_0``)."""
  run_dir = pathlib.Path(run_dir)
  return {str(p.parent.relative_to(run_dir)) or ".": p
          for p in sorted(run_dir.rglob("log.jsonl")) if p.stat().st_size > 0}


def _img(path: pathlib.Path, width: int | None = None) -> str:
  data = base64.b64encode(path.read_bytes()).decode()
  style = f' style="max-width:{width}px"' if width else ' style="max-width:100%"'
  return f'<img src="data:image/png;base64,{data}"{style} alt="{html.escape(path.name)}">'


def write_summary(path: str | os.PathLike, *, title: str,
                  tables: Mapping[str, pd.DataFrame] = {},
                  logs: Mapping[str, str | os.PathLike] = {},
                  images: Sequence[str | os.PathLike] = (),
                  notes: Sequence[str] = ()) -> pathlib.Path:
  """Writes the HTML page; learning curves are drawn from ``logs`` (JSON-lines training logs)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
           "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
           "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
           "th{background:#eee}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
  for note in notes:
    parts.append(f"<p>{html.escape(note)}</p>")
  for name, df in tables.items():
    parts.append(f"<h2>{html.escape(name)}</h2>")
    parts.append(df.to_html(index=False, float_format=lambda x: f"{x:.4f}", na_rep="-",
                            border=0))
  if logs:
    curves = plots.learning_curves(logs, path.with_name(path.stem + "_learning_curves.png"))
    parts += ["<h2>Learning curves</h2>", _img(curves)]
  if images:
    parts.append("<h2>Studies</h2>")
    parts += [_img(pathlib.Path(p), 900) for p in images]
  parts.append("</body></html>")
  files.write_text(path, "\n".join(parts))
  return path
