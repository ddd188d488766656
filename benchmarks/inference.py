"""Inference speed: seconds per study end to end and per stage, against the decode-only floor.

    python benchmarks/inference.py [--studies DIR | --num_studies 4] [--workdir RUN] [--folds 2]
    python benchmarks/inference.py --paper --size full --dtype bfloat16   (paper-size models, on a GPU)

Without --workdir the two stages are the ``configs/stage1.py:cpu`` and ``configs/stage2.py:cpu``
models (and the ``configs/box_refine.py:cpu`` refiner unless --norefine), freshly initialised (the
timings do not depend on the weights), ``--folds`` copies each as the fold ensemble. Without
--studies a few synthetic studies are generated into a temporary folder.
The baselines measured in the same run: the decode-only floor (every study read with the same
readers, nothing else; ``--decode_workers 0,8`` measures each reader count in turn) and the
host-side stage-1 image building alone; the ratio says how much the models and crops add on top
of reading the files. Last, the hours that rate projects for the RSNA training studies and the
hidden Kaggle test set on the measured machine.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# What the spawned decoder processes import again when they re-import this module: no JAX.
from cspine_jax import cli_setup
from cspine_jax.infer import reader
from cspine_jax.pp import options as options_lib

_STUDIES = flags.DEFINE_string("studies", None, "test_images/-style folder (default: generate "
                               "synthetic ones)")
_NUM_STUDIES = flags.DEFINE_integer("num_studies", 4, "synthetic studies to generate")
_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run (stage1/, stage2/, inference.json)")
_FOLDS = flags.DEFINE_integer("folds", 2, "fold models per stage (fresh models)")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "default: 64, or 224 with --paper")
_PAPER = flags.DEFINE_bool("paper", False, "paper-size models (ConvNeXt-Tiny, 224 px)")
_DTYPE = flags.DEFINE_string("dtype", None, "compute dtype override, e.g. bfloat16")
_SIZE = flags.DEFINE_string("size", "small", "synthetic study size: tiny, small or full (512 px)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "images per model call")
_REFINE = flags.DEFINE_bool("refine", True, "fresh models with the box refiner")
_REFINE_PASSES = flags.DEFINE_integer(
    "refine_passes", 1, "refiner passes per box for fresh models (a trained run: its "
    "inference.json)")
_DECODE_WORKERS = flags.DEFINE_string(
    "decode_workers", "0", "decoder processes, or a comma list of counts measured in turn (0: "
    "one reader thread)")

# The RSNA 2022 training set (train.csv) and, assumed from the competition's data page, its hidden
# test set and a scoring notebook's run-time limit.
TRAIN_STUDIES = 2019
KAGGLE_TEST_STUDIES = 1500  # assumed ("roughly 1,500"): not verified here
KAGGLE_HOURS = 9.0  # assumed


def projection(seconds_per_study: float, slices: float, how: str) -> str:
  """The hours ``seconds_per_study`` projects for the training studies and the Kaggle test set."""
  hours = lambda n: n * seconds_per_study / 3600
  test = hours(KAGGLE_TEST_STUDIES)
  return (f"projected at {seconds_per_study:.3f} s/study ({how}, studies of {slices:.0f} slices "
          f"on average): the {TRAIN_STUDIES:,} training studies {hours(TRAIN_STUDIES):.2f} h; "
          f"the hidden Kaggle test set (assumed {KAGGLE_TEST_STUDIES:,} studies) {test:.2f} h "
          f"(assumed limit {KAGGLE_HOURS:.0f} h: {'within' if test <= KAGGLE_HOURS else 'OVER'})")


def fresh_models(folds: int, image_size: int, variant: str = "cpu",
                 dtype: str | None = None, refine: bool = True,
                 refine_passes: int = 1):
  """The stage-1/stage-2 (and box-refiner, ``refine_passes`` per box) models of ``variant``
  ("cpu" or "" = paper), randomly initialised, ``folds`` members each."""
  from configs import box_refine as refine_config  # lazy: decoder processes re-import this module
  from configs import stage1 as stage1_config  # lazy: decoder processes re-import this module
  from configs import stage2 as stage2_config  # lazy: decoder processes re-import this module
  from flax import nnx  # lazy: decoder processes re-import this module
  from cspine_jax import models  # lazy: decoder processes re-import this module
  from cspine_jax.infer import ensemble  # lazy: decoder processes re-import this module
  from cspine_jax.infer import spec  # lazy: decoder processes re-import this module

  ensembles = []
  for cfg, task in ((stage1_config.get_config(variant), "stage1"),
                    (stage2_config.get_config(variant), "stage2"),
                    (refine_config.get_config(variant), "box_refine")):
    if dtype:
      cfg.model.dtype = dtype
    members = [(models.make_model(cfg.model, rngs=nnx.Rngs(k)), {"task": task, "fold": k})
               for k in range(folds)]
    ensembles.append(ensemble.FoldEnsemble(members, task))
  s2 = stage2_config.get_config(variant)
  options = options_lib.Options(image_size=(image_size, image_size),
                              stage2_slices=s2.prepare.stage2_slices)
  out = spec.ensemble_models(ensembles[0], ensembles[1], options, options)
  if refine:
    out.refiner, out.refine_options = ensemble.refine_scorer(ensembles[2]), options
    out.refine_passes = refine_passes
  return out


def main(argv) -> int:
  cli_setup.begin(argv)
  import jax  # lazy: decoder processes re-import this module
  from cspine_jax.infer import predict  # lazy: decoder processes re-import this module
  from cspine_jax.infer import spec  # lazy: decoder processes re-import this module
  from cspine_jax.train import runtime  # lazy: decoder processes re-import this module
  runtime.start()
  workdir, num_studies = _WORKDIR.value, _NUM_STUDIES.value
  tmp = None
  if _STUDIES.value:
    studies = pathlib.Path(_STUDIES.value)
  else:
    from cspine_jax import synthetic  # lazy: decoder processes re-import this module
    tmp = tempfile.TemporaryDirectory(prefix="bench_infer_")
    synthetic.generate(pathlib.Path(tmp.name) / "rsna", num_studies, 0, size=_SIZE.value,
                       num_test=0, workers=max(1, min(os.cpu_count() or 1, num_studies)))
    studies = pathlib.Path(tmp.name) / "rsna" / "train_images"
  folders = predict.find_studies(studies)
  image_size = _IMAGE_SIZE.value or (224 if _PAPER.value else 64)
  variant = "" if _PAPER.value else "cpu"
  models = (spec.load_models(workdir) if workdir
            else fresh_models(_FOLDS.value, image_size, variant, _DTYPE.value, _REFINE.value,
                              _REFINE_PASSES.value))
  prior = [0.5] * 8

  # Warm-up on one study: compilation is paid once per process, not per study.
  predict.run(folders[:1], models, prior, batch_size=_BATCH_SIZE.value)

  what = (f"trained run {workdir}" if workdir
          else f"fresh {variant or 'paper'} x{_FOLDS.value} folds")
  print(f"studies: {len(folders)}, models: {what}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores")
  for workers in [int(w) for w in _DECODE_WORKERS.value.split(",")]:
    how = f"{workers} decoder processes" if workers else "one decoder thread"
    # Baselines in the same run: decoding alone with the same readers, and the host-side stage-1
    # image building (windowing, resizing, 2.5D stacking) alone.
    t0 = time.perf_counter()
    series = [s for _, s, _, _ in reader.read_studies(folders, workers=workers)]
    floor = (time.perf_counter() - t0) / len(folders)
    t0 = time.perf_counter()
    for s in series:
      if s is not None:
        reader.stage1_inputs(s, models.stage1_options)
    images_s = (time.perf_counter() - t0) / len(folders)
    del series

    stamps: list[float] = []  # when each study's result was ready
    first = 4  # studies per stage-2 batch: the first results arrive together
    t0 = time.perf_counter()
    result = predict.run(folders, models, prior, batch_size=_BATCH_SIZE.value,
                         studies_per_batch=first, decode_workers=workers,
                         on_study=lambda *_: stamps.append(time.perf_counter()))
    total = (time.perf_counter() - t0) / len(folders)
    per = {k: v / len(folders) for k, v in result.seconds.items()}
    slices = sum(r.shape[0] for r in result.results if r.shape) / len(folders)
    located = sum(p.present for r in result.results if r.vertebrae for p in r.vertebrae)
    print(f"--- {how}: mean {slices:.0f} slices per study")
    print("seconds per study by stage (decode: summed over the decoders): "
          + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    print(f"vertebrae located by stage 1 (and cropped): {located} of {7 * len(folders)}")
    print(f"decode-only floor (baseline, same readers, same run): {floor:.3f} s/study; "
          f"stage-1 image building alone (host): {images_s:.3f} s/study")
    print(f"end to end: {total:.3f} s/study; ratio to the decode floor: {total / floor:.2f}x "
          f"({how})")
    rate = total
    if len(stamps) > first:  # without the readers' start: what a long test set would see
      rate = (stamps[-1] - stamps[first - 1]) / (len(stamps) - first)
      print(f"after the first {first} results: {rate:.3f} s/study "
            f"over {len(stamps) - first} studies")
    print(projection(rate, slices, f"{how}, {jax.devices()[0].device_kind}, "
                     f"{os.cpu_count()} CPU cores"))
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == "__main__":
  app.run(main)
