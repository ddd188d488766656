"""Inference speed: seconds per study end to end and per stage, against the decode-only floor.

    python benchmarks/inference.py [--studies DIR | --num_studies 4] [--workdir RUN] [--folds 2]
    python benchmarks/inference.py --paper --size full --dtype bfloat16   (paper-size models, on a GPU)

Without --workdir the two stages are the ``configs/stage1.py:cpu`` and ``configs/stage2.py:cpu``
models (and the ``configs/box_refine.py:cpu`` refiner unless --no_refine), freshly initialised (the timings do not depend on the weights), ``--folds`` copies each as
the fold ensemble. Without --studies a few synthetic studies are generated into a temporary folder.
The baselines measured in the same run: the decode-only floor (every study read with the same
readers, nothing else; ``--decode_workers 0,8`` measures each reader count in turn) and the
host-side stage-1 image building alone; the ratio says how much the models and crops add on top
of reading the files.
For reference the seed method needed 6.5 s per study on a GPU (full-size models, 224 px).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from cspine_jax.infer import ensemble
from cspine_jax.infer import predict
from cspine_jax.infer import spec
from cspine_jax.infer import reader  # noqa: E402
from cspine_jax.pp import options as options_lib


def fresh_models(folds: int, image_size: int, variant: str = "cpu",
                 dtype: str | None = None, refine: bool = True,
                 refine_passes: int = 1) -> spec.Models:
  """The stage-1/stage-2 (and box-refiner, ``refine_passes`` per box) models of ``variant``
  ("cpu" or "" = paper), randomly initialised, ``folds`` members each."""
  from flax import nnx
  from configs import box_refine as refine_config
  from configs import stage1 as stage1_config, stage2 as stage2_config
  from cspine_jax import models

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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--studies", help="test_images/-style folder (default: generate synthetic ones)")
  p.add_argument("--num_studies", type=int, default=4)
  p.add_argument("--workdir", help="a trained run (stage1/, stage2/, inference.json)")
  p.add_argument("--folds", type=int, default=2)
  p.add_argument("--image_size", type=int, default=None, help="default: 64, or 224 with --paper")
  p.add_argument("--paper", action="store_true", help="paper-size models (ConvNeXt-Tiny, 224 px)")
  p.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
  p.add_argument("--size", default="small", help="synthetic study size: tiny, small or full (512 px)")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--no_refine", action="store_true", help="fresh models without the box refiner")
  p.add_argument("--refine_passes", type=int, default=1,
                 help="refiner passes per box for fresh models (a trained run: its inference.json)")
  p.add_argument("--decode_workers", default="0",
                 help="decoder processes, or a comma list of counts measured in turn (0: one "
                      "reader thread)")
  args = p.parse_args(argv)
  # Imported here, not at the top: decoder processes re-import this module (spawn) and, like the
  # predict command's, should not pay JAX's import.
  import jax

  tmp = None
  if args.studies:
    studies = pathlib.Path(args.studies)
  else:
    from cspine_jax import synthetic
    tmp = tempfile.TemporaryDirectory(prefix="bench_infer_")
    synthetic.generate(pathlib.Path(tmp.name) / "rsna", args.num_studies, 0, size=args.size,
                       num_test=0, workers=max(1, min(os.cpu_count() or 1, args.num_studies)))
    studies = pathlib.Path(tmp.name) / "rsna" / "train_images"
  folders = predict.find_studies(studies)
  image_size = args.image_size or (224 if args.paper else 64)
  variant = "" if args.paper else "cpu"
  models = (spec.load_models(args.workdir) if args.workdir
            else fresh_models(args.folds, image_size, variant, args.dtype, not args.no_refine,
                                 args.refine_passes))
  prior = [0.5] * 8

  # Warm-up on one study: compilation is paid once per process, not per study.
  predict.run(folders[:1], models, prior, batch_size=args.batch_size)

  what = (f"trained run {args.workdir}" if args.workdir
          else f"fresh {variant or 'paper'} x{args.folds} folds")
  print(f"studies: {len(folders)}, models: {what}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores")
  for workers in [int(w) for w in str(args.decode_workers).split(",")]:
    how = f"{workers} decoder processes" if workers else "one decoder thread"
    # Baselines in the same run: decoding alone with the same readers, and the host-side stage-1
    # image building (windowing, resizing, 2.5D stacking) alone.
    t0 = time.perf_counter()
    series = [s for _, s, _, _ in reader.read_studies(folders, workers=workers)]
    floor = (time.perf_counter() - t0) / len(folders)
    t0 = time.perf_counter()
    for s in series:
      if s is not None:
        predict.stage1_inputs(s, models.stage1_options)
    images_s = (time.perf_counter() - t0) / len(folders)
    del series

    stamps: list[float] = []  # when each study's result was ready
    first = 4  # studies per stage-2 batch: the first results arrive together
    t0 = time.perf_counter()
    result = predict.run(folders, models, prior, batch_size=args.batch_size,
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
    if len(stamps) > first:  # without the readers' start: what a long test set would see
      print(f"after the first {first} results: "
            f"{(stamps[-1] - stamps[first - 1]) / (len(stamps) - first):.3f} s/study "
            f"over {len(stamps) - first} studies")
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
