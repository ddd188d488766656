"""What a run folder holds for inference besides the checkpoints, and the models it loads.

RUN/inference.json (:func:`write_spec`) keeps each stage's preprocessing options, the
pseudo-label rules with what was fitted (template, box offsets), the box refiner's options and
passes, and the patient_overall rule; RUN/prior.json the training label means that a study that
cannot be predicted falls back to. :func:`load_models` turns a run folder into :class:`Models`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any
from typing import Callable

import numpy as np
import pandas as pd

from cspine_jax import aggregate
from cspine_jax import labels as labels_lib
from cspine_jax.infer import ensemble
from cspine_jax.io import files
from cspine_jax.localize import derive as derive_lib
from cspine_jax.localize import refine as refine_lib
from cspine_jax.pp import options as options_lib

# uint8 stage-2 sequences (N, n/3, H, W, 3) and their vertebra indices (N,) -> (N,) probabilities.
Stage2Fn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Models:
  """Everything inference needs from a training run."""
  stage1: derive_lib.Stage1Fn
  stage2: Stage2Fn
  options: options_lib.Options  # stage 2's preprocessing (as its records were made)
  rules: derive_lib.Rules = derive_lib.Rules()
  top_n: int = aggregate.DEFAULT_TOP_N
  stage1_options: options_lib.Options | None = None  # stage 1's, when it differs from stage 2's
  # The box refiner (a box_refine run) and its records' options; None: the derived boxes stand.
  refiner: refine_lib.RefineFn | None = None
  refine_options: options_lib.Options | None = None
  refine_passes: int = 1  # as the pseudo-labels stage 2 trained on were refined

  def __post_init__(self):
    if (self.refiner is None) != (self.refine_options is None):
      raise ValueError("a box refiner needs its options (and options need a refiner)")
    if self.stage1_options is None:
      self.stage1_options = self.options


# ----------------------------------------------------------------------------- prior and outputs


def load_prior(path: str | os.PathLike) -> np.ndarray:
  """The fallback probabilities (8,): label means of a train.csv, or a prior.json {target: p}."""
  path = pathlib.Path(path)
  if path.suffix.lower() == ".json":
    try:
      data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise ensemble.PredictError(f"{path}: cannot read the prior: {e}") from e
    try:
      prior = np.array([float(data[t]) for t in labels_lib.TARGETS])
    except (KeyError, TypeError, ValueError) as e:
      raise ensemble.PredictError(
          f"{path}: needs a probability for each of {labels_lib.TARGETS}: {e}") from e
  else:
    prior = labels_lib.read_train_csv(path)[list(labels_lib.TARGETS)].to_numpy(np.float64).mean(0)
  if not np.all((prior >= 0) & (prior <= 1)):
    raise ensemble.PredictError(
        f"{path}: prior probabilities must lie in [0, 1], got {prior.tolist()}")
  return prior


def write_prior(path: str | os.PathLike, train_labels: pd.DataFrame) -> None:
  """Saves the training label means as prior.json (what a run folder keeps for fallbacks)."""
  means = train_labels[list(labels_lib.TARGETS)].to_numpy(np.float64).mean(0)
  files.write_json(path, dict(zip(labels_lib.TARGETS, means.tolist())))


# ----------------------------------------------------------------------------- trained models

SPEC = "inference.json"  # RUN/inference.json: the preprocessing and the patient_overall rule
PRIOR = "prior.json"  # RUN/prior.json: training label means, the fallback probabilities


def write_spec(run_dir: str | os.PathLike, *, top_n: int = aggregate.DEFAULT_TOP_N,
               rules: derive_lib.Rules = derive_lib.Rules(), refine: bool = False,
               refine_passes: int = 1) -> pathlib.Path:
  """Saves RUN/inference.json: what inference needs besides the checkpoints, i.e. what was decided
  after training: the pseudo-label rules with what was fitted, whether (and how often) the box
  refiner refines, and the patient_overall rule. Each stage's preprocessing is not written: the
  models' checkpoints carry the options of the records they trained on."""
  path = pathlib.Path(run_dir) / SPEC
  path.parent.mkdir(parents=True, exist_ok=True)
  spec = {"top_n": top_n, "rules": dataclasses.asdict(rules), "refine": bool(refine)}
  if refine:
    spec["refine_passes"] = refine_lib.check_refine_passes(refine_passes)
  files.write_json(path, spec)
  return path


def _options(ensemble_: ensemble.FoldEnsemble, spec: dict[str, Any], key: str,
             spec_path: pathlib.Path) -> options_lib.Options:
  """A stage's preprocessing: its models' record options; an inference.json of an older run may
  name them too, and then they must agree."""
  from_models = ensemble_.record_options()
  named = spec.get(key)
  if named is not None:
    named = options_lib.Options.from_json(named)
    if from_models is not None and named != from_models:
      diff = {k: (v, getattr(from_models, k)) for k, v in named.to_json().items()
              if v != from_models.to_json()[k]}
      raise ensemble.PredictError(
          f"{spec_path}: {key} differ from the records the {ensemble_.task.name} models trained "
          f"on ((spec, models): {diff})")
  options = from_models or named
  if options is None:
    raise ensemble.PredictError(f"{spec_path}: the {ensemble_.task.name} models' checkpoints do "
                                f"not say how their records were made, and {key} is missing")
  return options


def load_models(run_dir: str | os.PathLike, top_n: int | None = None) -> Models:
  """RUN/stage1 and RUN/stage2 (and RUN/box_refine) fold ensembles plus RUN/inference.json ->
  :class:`Models`; each stage preprocesses as the records its models trained on."""
  run_dir = pathlib.Path(run_dir)
  spec_path = run_dir / SPEC
  try:
    spec = json.loads(spec_path.read_text())
    rules = derive_lib.Rules(**spec.get("rules", {}))
    refine = bool(spec.get("refine", spec.get("refine_options") is not None))
    refine_passes = refine_lib.check_refine_passes(spec.get("refine_passes", 1))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ensemble.PredictError(
        f"{spec_path}: cannot read the inference spec ({e}); the pipeline's pseudo-label step (or "
        "cspine_jax.pseudo_labels --workdir) writes it")
  stage1 = ensemble.FoldEnsemble.load(run_dir / "stage1", "stage1")
  stage2 = ensemble.FoldEnsemble.load(run_dir / "stage2", "stage2")
  models = ensemble_models(
      stage1, stage2, _options(stage1, spec, "stage1_options", spec_path),
      _options(stage2, spec, "stage2_options", spec_path), rules=rules,
      top_n=int(top_n if top_n is not None else spec.get("top_n", aggregate.DEFAULT_TOP_N)))
  if refine:  # the pseudo-labels stage 2 trained on were refined: so is inference
    refiner = ensemble.FoldEnsemble.load(run_dir / "box_refine", "box_refine")
    models.refiner = ensemble.refine_scorer(refiner)
    models.refine_options = _options(refiner, spec, "refine_options", spec_path)
    models.refine_passes = refine_passes
  return models


def ensemble_models(stage1: ensemble.FoldEnsemble, stage2: ensemble.FoldEnsemble,
                    stage1_options: options_lib.Options, stage2_options: options_lib.Options, *,
                    rules: derive_lib.Rules = derive_lib.Rules(),
                    top_n: int = aggregate.DEFAULT_TOP_N) -> Models:
  """:class:`Models` whose two stages are fold ensembles."""

  def stage2_fn(images, vertebra):
    return stage2({"images": images, "vertebra": vertebra.astype(np.int32)})["prob"]

  return Models(stage1=ensemble.stage1_scorer(stage1), stage2=stage2_fn, options=stage2_options,
                stage1_options=stage1_options, rules=rules, top_n=top_n)
