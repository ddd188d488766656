"""The method, the baselines, the shortcut probe and the prior across generator difficulties.

    python benchmarks/difficulty.py [--levels easy,realistic,hard] [--seeds 0,1,2]
        [--workdir runs/difficulty] [--config configs/demo.py]

For each difficulty and data seed, the demo's method runs end to end on its own generated set
(``--config.synthetic.difficulty``, data seed = model seed = the seed): leak-free out-of-fold
figures (pseudo-labels from the models that never saw a study, the last checkpoint, each fold's
prior from its training folds). Each run is a pipeline workdir, so a stopped benchmark resumes
where it was. The table gives, per level, the mean and the range over the seeds of each model's
out-of-fold competition metric and its ratio to the prior: one seed's figure moves by ±0.04 or
more, which is why one run says little.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import sys

import numpy as np
from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from cspine_jax import cli_setup  # noqa: E402
from cspine_jax.pipeline import runner  # noqa: E402

_LEVELS = flags.DEFINE_list("levels", ["easy", "realistic", "hard"], "generator difficulties")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "data (and model) seeds per level")
_WORKDIR = flags.DEFINE_string("workdir", "runs/difficulty", "one run folder per level and seed")
_CONFIG = flags.DEFINE_string("config", "configs.demo", "the method config's module")
_VARIANT = flags.DEFINE_string("variant", "", "its variant (e.g. tiny, for a quick check)")


def run_one(level: str, seed: int, workdir: pathlib.Path) -> dict:
  module = importlib.import_module(_CONFIG.value)
  c = module.get_config(_VARIANT.value or None)
  c.synthetic.difficulty = level
  c.synthetic.seed = seed
  c.seed = seed
  c.progress = False
  return runner.run(c, workdir, log=lambda _: None)


def table(rows: dict[tuple[str, int], dict]) -> str:
  """A markdown table: per level and model, mean (range) of the metric and of its prior ratio."""
  out = ["| difficulty | model | out-of-fold metric, mean (range) | / prior, mean (range) | seeds |",
         "| --- | --- | ---: | ---: | ---: |"]
  for level in dict.fromkeys(k[0] for k in rows):
    runs = [figures for (lv, _), figures in rows.items() if lv == level]
    models = list(dict.fromkeys(r["model"] for f in runs for r in f["results"]))
    for model in models:
      score, ratio = [], []
      for f in runs:
        by = {r["model"]: r["score"] for r in f["results"]}
        prior = next(v for k, v in by.items() if k.startswith("Prior"))
        if model in by:
          score.append(by[model])
          ratio.append(by[model] / prior)
      out.append(f"| {level} | {model} | {np.mean(score):.3f} ({min(score):.3f}–{max(score):.3f}) "
                 f"| {np.mean(ratio):.2f} ({min(ratio):.2f}–{max(ratio):.2f}) | {len(score)} |")
  return "\n".join(out)


def main(argv) -> int:
  cli_setup.begin(argv)
  root = pathlib.Path(_WORKDIR.value)
  rows = {}
  for level in _LEVELS.value:
    for seed in (int(s) for s in _SEEDS.value):
      workdir = root / f"{level}_seed{seed}"
      figures = run_one(level, seed, workdir)
      rows[(level, seed)] = figures
      oof = figures["oof"]
      print(f"{level} seed {seed}: two-stage {oof['two_stage']:.4f}, prior {oof['prior']:.4f} "
            f"(ratio {oof['ratio']:.2f}) -> {workdir}", flush=True)
  text = table(rows)
  (root / "table.md").write_text(text + "\n")
  (root / "figures.json").write_text(json.dumps({f"{k[0]}_seed{k[1]}": v["results"]
                                                 for k, v in rows.items()}, indent=1))
  print(text)
  return 0


if __name__ == "__main__":
  app.run(main)
