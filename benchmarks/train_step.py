"""Train/eval step throughput of every model, and how fast grain feeds it (ratios, same run).

    python benchmarks/train_step.py [--configs stage2,stage1,box_refine,cnn3d,single_head,multi_head]
        [--paper | --paper_only] [--dtype bfloat16] [--batch_size N] [--steps 5] [--input_batches 20]

For each config at its ``:cpu`` size (and, with --paper, at the paper size for a couple of steps):
  * train steps/s and images/s (an image = one 2D input image; a stage-2 sample has 8, a 3D volume
    counts as one), measured after compilation on a fixed random uint8 batch; the step includes
    the augmentation (rotation + flip) and normalisation it runs on the device;
  * inference (eval step, normalisation included) steps/s and images/s;
  * the augmentation + normalisation alone (``Trainer.prepare_step``), ms per batch;
  * grain input throughput: batches/s of the training pipeline (read, decode, batch uint8,
    ``input.workers`` processes) over random records of the config's shapes written to a
    temporary folder, and its ratio to the train step's consumption (goal >= 2 for :cpu).
  * seconds to build the model and optimizer state, and of the first train step (compile + run):
    where a short device slot goes before any step is timed;
  * model FLOPs per train step (its matmuls and convolutions, `train.flops`) and, on a GPU whose peak
    is known, the model FLOPs utilisation (MFU) = achieved FLOP/s / the chip's dense bf16 peak.
The machine may be shared: compare the ratios, not the absolute numbers. The process is set up
as every run's is (``train.runtime.start``: allocator setting, native CPU kernels) before timing.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import timing  # noqa: E402

from cspine_jax.inputs import loader as loader_lib  # noqa: E402
from cspine_jax.records import schema, shards  # noqa: E402
from cspine_jax.train import flops as flops_lib  # noqa: E402
from cspine_jax.train import loop, runtime, sharding  # noqa: E402
from cspine_jax.train import steps as steps_lib  # noqa: E402

_CONFIGS = flags.DEFINE_string("configs", "stage2,stage1,box_refine,cnn3d,single_head,multi_head",
                               "comma-separated config modules under configs/")
_PAPER = flags.DEFINE_bool("paper", False, "also the paper-size configs (slow on CPU)")
_PAPER_ONLY = flags.DEFINE_bool("paper_only", False, "only the paper-size configs (GPU)")
_DTYPE = flags.DEFINE_string("dtype", None, "compute dtype override, e.g. bfloat16")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "batch size override")
_WORKERS = flags.DEFINE_integer(
    "workers", None, "grain worker processes override (paper-size configs have 2, :cpu ones 0)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed train / eval steps per config")
_INPUT_BATCHES = flags.DEFINE_integer("input_batches", 20, "timed input batches per config")

IMAGES_PER_SAMPLE = {"stage2": 8, "stage1": 1, "cnn3d": 1, "slices2d": 1, "box_refine": 1}


def random_record(task: str, config, i: int, rng: np.random.Generator) -> dict:
  h, w = config.prepare.image_size
  img = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
  base = {"study_uid": f"1.2.3.{i // 7}", "fold": (i // 7) % config.num_folds}
  if task == "stage2":
    n = config.prepare.stage2_slices // 3
    return dict(base, images=img(n, h, w, 3), label=np.float32(i % 4 == 0), vertebra=i % 7,
                present=True)
  if task == "stage1":
    return dict(base, image=img(h, w, 3), presence=(rng.random(7) < 0.3).astype(np.float32),
                area=rng.random(7).astype(np.float32),
                box=np.array([0.2, 0.2, 0.7, 0.8], np.float32), index=i, number=i + 1)
  if task == "box_refine":
    return dict(base, image=img(h, w, 3), box=np.array([0.3, 0.3, 0.7, 0.7], np.float32),
                vertebra=i % 7, sample=i)
  if task == "cnn3d":
    d = config.prepare.cube_size
    return dict(base, volume=img(d, d, d, 1), labels=(rng.random(8) < 0.3).astype(np.float32))
  return dict(base, image=img(h, w, 3), presence=(rng.random(7) < 0.3).astype(np.float32),
              fracture=(rng.random(7) < 0.1).astype(np.float32), index=i)


def write_records(folder: pathlib.Path, task: str, config, n: int) -> pathlib.Path:
  """n random records in the layout data_prep.prepare writes (a shard per study + manifest)."""
  rng = np.random.default_rng(0)
  recs = [random_record(task, config, i, rng) for i in range(n)]
  task_dir = folder / task
  task_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for start in range(0, n, 7):
    uid = recs[start]["study_uid"]
    count = shards.write_shard(task_dir / f"{uid}.array_record", recs[start:start + 7])
    rows.append({"file": f"{uid}.array_record", "study_uid": uid, "fold": recs[start]["fold"],
                 "num_records": count})
  shards.write_json(task_dir / shards.MANIFEST, {
      "schema_version": schema.SCHEMA_VERSION, "task": task, "num_folds": config.num_folds,
      "num_records": n, "shards": rows})
  return folder


# Dense bf16 peak FLOP/s by device kind (vendor figures, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5e": 197e12, "TPU v4": 275e12}


def peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


def step_flops(jitted, *args) -> float:
  """Model FLOPs of one call of a jitted step: its matmuls and convolutions, counted from the
  jaxpr (`train.flops`), so every backend reports the same figure."""
  return float(flops_lib.count(jitted, *args))


def bench(name: str, variant: str, steps: int, input_batches: int, dtype: str | None = None,
          batch_size: int | None = None, workers: int | None = None) -> dict:
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  if dtype:
    config.model.dtype = dtype
  if batch_size:
    config.input.batch_size = batch_size
  if workers is not None:
    config.input.workers = workers
  task = config.task
  mesh = sharding.make_mesh()
  t = time.perf_counter()
  trainer = loop.make_trainer(config, 1000, mesh, seed=0)
  build_s = time.perf_counter() - t  # model + optimizer state (see loop.init_in_one_program)
  with tempfile.TemporaryDirectory() as tmp:
    n_records = max((16 if variant else 4) * config.input.batch_size, 28)
    records = write_records(pathlib.Path(tmp), task, config, n_records)
    src = loader_lib.record_index(records, task).source()
    loader = loader_lib.make_loader(src, task, batch_size=config.input.batch_size, train=True,
                                   seed=0, workers=config.input.workers)
    it = iter(loader)
    batch = next(it)
    for _ in range(5 if variant else 0):  # steady state: worker start-up is not throughput
      next(it)
    t = time.perf_counter()
    for _ in range(input_batches):
      next(it)
    input_s = (time.perf_counter() - t) / input_batches
    it.close()
  gbatch = sharding.shard_batch(batch, mesh)

  def train():
    trainer.state, m = trainer.train_step(trainer.state, gbatch)
    return m["loss"]

  eval_batch = sharding.shard_batch(dict(batch, mask=np.ones(len(batch["record_id"]), np.float32)), mesh)
  flops = step_flops(trainer.update_step, trainer.state,
                     trainer.prepare_step(steps_lib.optimizer_step(trainer.state), gbatch))
  peak = peak_flops()
  first_train_s = timing.first_call(train)
  train_s = timing.timed(train, steps, warm_up=False)
  field = loader_lib.IMAGE_FIELD[task]
  step0 = steps_lib.optimizer_step(trainer.state)
  augment_s = (timing.timed(lambda: trainer.prepare_step(step0, gbatch)[field], steps)
               if trainer.augment else 0.0)
  eval_s = timing.timed(lambda: trainer.eval_step(trainer.state, eval_batch)[0], steps)
  images = config.input.batch_size * IMAGES_PER_SAMPLE[task]
  if task == "stage2":
    images = config.input.batch_size * (config.prepare.stage2_slices // 3)
  return {"config": f"{name}:{variant}" if variant else name, "batch": config.input.batch_size,
          "train_steps_per_s": 1 / train_s, "train_images_per_s": images / train_s,
          "eval_steps_per_s": 1 / eval_s, "eval_images_per_s": images / eval_s,
          "augment_ms": 1e3 * augment_s, "train_ms": 1e3 * train_s,
          "input_batches_per_s": 1 / input_s, "input_over_train": train_s / input_s,
          "workers": config.input.workers, "dtype": config.model.dtype,
          "build_s": build_s, "first_train_step_s": first_train_s,
          "train_gflop_per_step": flops / 1e9 if flops else None,
          "train_tflops": flops / train_s / 1e12 if flops else None,
          "mfu": flops / train_s / peak if flops and peak else None}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.start()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}")
  rows = []
  for name in _CONFIGS.value.split(","):
    variants = [""] if _PAPER_ONLY.value else ["cpu"] + ([""] if _PAPER.value else [])
    for variant in variants:
      on_cpu = jax.default_backend() == "cpu"
      steps = _STEPS.value if variant or not on_cpu else 2
      try:
        row = bench(name, variant, steps, _INPUT_BATCHES.value if variant or not on_cpu else 3,
                    _DTYPE.value, _BATCH_SIZE.value, _WORKERS.value)
      except (ImportError, AttributeError, ValueError, KeyError) as e:
        print(f"{name}:{variant}: skipped ({type(e).__name__}: {e})")
        continue
      rows.append(row)
      print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
  for r in rows:
    print(f"{r['config']:>16}: train {r['train_steps_per_s']:.2f} steps/s "
          f"({r['train_images_per_s']:.1f} img/s, augmentation {r['augment_ms']:.1f} of "
          f"{r['train_ms']:.1f} ms), eval {r['eval_images_per_s']:.1f} img/s, "
          f"grain/train ratio {r['input_over_train']:.2f} (goal >= 2 for :cpu)"
          + (f", {r['train_tflops']:.1f} TFLOP/s" if r["train_tflops"] else "")
          + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
          + f"; build {r['build_s']:.1f} s, "
          f"first train step (compile) {r['first_train_step_s']:.1f} s")


if __name__ == "__main__":
  app.run(main)
