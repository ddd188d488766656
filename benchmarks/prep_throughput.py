"""Preprocessing throughput (slices/s) against two baselines measured in the same run.

    python benchmarks/prep_throughput.py [--num_studies 4] [--transfer_syntax explicit]
        [--workers 2] [--repeats 2] [--data_dir EXISTING_RSNA_FOLDER]

Without --data_dir it generates full-size (mostly 512 x 512, 200-400 slices) segmented synthetic
studies first (not timed), with their ground_truth.json.
(a) decode floor: pydicom read + pixel decode (``dcmread(f).pixel_array``) of every file, ONE
    process, nothing more. The same loop split over --workers processes is printed too (a'), for
    information: the targets below are defined against the one-process floor.
(b) this pipeline: data_prep.prepare's tasks (224 px, paper defaults) with --workers processes,
    output written to a temporary folder, on the same files:
    - stage2 from a --vertebrae file (the common case: 1932 of the 2019 RSNA studies have no mask);
      the file is made from ground_truth.json and the studies are seen without their masks;
    - stage2 from the masks (segmented studies);
    - stage1 (segmented studies: masks -> per-slice labels, every slice a 2.5D image).
(c) notebook loop: one process reads every file, sorts by position, stacks, applies the rescale and
    the window in float64, builds each 2.5D RGB image and resizes it with PIL.
The last lines print b/a (target >= 1/1.3 = 0.77) and b/c (target >= 3) for each mode, each the
ratio of slices/s (slices of the studies the task read). Each configuration is repeated and the
best run is kept (the machine may be shared); baselines and pipeline run in the same process, on
the same files, one after another. CPU ms per slice (all processes together, the workers
included) is printed too: unlike the wall-clock ratios it does not depend on how busy the machine
is, so on a shared machine "CPU per slice, mode / floor" tells what an idle one would show.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np
import pydicom
from absl import app
from absl import flags
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from cspine_jax import cli_setup
from cspine_jax import labels as labels_lib  # noqa: E402
from cspine_jax.io import vertebrae as vertebrae_lib  # noqa: E402
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.records import pipeline  # noqa: E402
from cspine_jax.synthetic import studies
from cspine_jax.synthetic import writers

_DATA_DIR = flags.DEFINE_string("data_dir", None, "an RSNA-format folder (default: generate one)")
_NUM_STUDIES = flags.DEFINE_integer(
    "num_studies", 4, "full studies hold 200-400 slices; a few per worker keep the workers busy")
_TRANSFER_SYNTAX = flags.DEFINE_string(
    "transfer_syntax", "explicit", "explicit, implicit, rle, jpegls or j2k (the generator's "
    "short names)")
_SEED = flags.DEFINE_integer("seed", 0, "generator seed")
_WORKERS = flags.DEFINE_integer("workers", 2, "record-writing (and parallel floor) processes")
_REPEATS = flags.DEFINE_integer("repeats", 2, "runs of each configuration; the best is kept")


def decode_floor(files: list[pathlib.Path]) -> int:
  for f in files:
    pydicom.dcmread(f).pixel_array  # noqa: B018 - decoding is the point.
  return len(files)


def decode_floor_parallel(files: list[pathlib.Path], workers: int) -> None:
  """The floor loop with the files dealt round-robin to ``workers`` processes (information only)."""
  ctx = multiprocessing.get_context("fork")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    list(pool.map(decode_floor, [files[k::workers] for k in range(workers)]))


def notebook_loop(study_dirs: list[pathlib.Path], size: int = 224) -> int:
  """What a typical Kaggle notebook does for 2.5D slices, one study after another."""
  n = 0
  for d in study_dirs:
    slices = []
    for f in sorted(d.glob("*.dcm")):
      ds = pydicom.dcmread(f)
      img = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
      slices.append((float(ds.ImagePositionPatient[2]), img))
    slices.sort(key=lambda t: -t[0])  # Head to feet.
    vol = np.stack([s[1] for s in slices])
    lo, hi = 400 - 1800 / 2, 400 + 1800 / 2
    vol = (np.clip((vol - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    out = []
    for i in range(len(vol)):
      rgb = np.stack([vol[max(i - 1, 0)], vol[i], vol[min(i + 1, len(vol) - 1)]], -1)
      out.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)))
    n += len(out)
  return n


def make_studies(root: pathlib.Path, num: int, seed: int, transfer_syntax: str) -> None:
  """Full-size segmented training studies (and ground_truth.json) through the generator's
  lower-level API."""
  rows, truth = [], {}
  for i in range(num):
    spec = studies.sample_study(seed, i, "full", has_segmentation=True,
                                transfer_syntax=transfer_syntax)
    entry, _ = studies.write_study(spec, root)
    truth[spec.uid] = {"index": i, **entry}
    fractured = [int(v in entry["fractured"]) for v in labels_lib.VERTEBRAE]
    rows.append((spec.uid, int(any(fractured)), *fractured))
  writers.write_csv(root / "train.csv", writers.TRAIN_COLUMNS, rows)
  (root / "ground_truth.json").write_text(json.dumps(
      {"version": studies.GROUND_TRUTH_VERSION, "seed": seed, "size": "full", "studies": truth}))


def without_masks(data: pathlib.Path, view: pathlib.Path) -> pathlib.Path:
  """The same studies seen without segmentations/ (links to the same files), as most RSNA ones."""
  view.mkdir()
  for name in ("train.csv", "train_images"):
    (view / name).symlink_to(data / name)
  return view


def vertebrae_from_ground_truth(gt: dict, path: pathlib.Path) -> None:
  """A --vertebrae file from the generator's truth, so stage2 can use the unsegmented studies."""
  preds = {}
  for uid, info in gt["studies"].items():
    if info["split"] != "train":
      continue
    _, h, w = info["shape"]
    row = []
    for name in labels_lib.VERTEBRAE:
      v = info["vertebrae"].get(name)
      row.append(vertebrae_lib.absent() if v is None else vertebrae_lib.VertebraPrediction(
          True, v["first"], v["last"], v["first_number"], v["last_number"],
          (v["box"][0] / w, v["box"][1] / h, v["box"][2] / w, v["box"][3] / h), 1.0))
    preds[uid] = tuple(row)
  vertebrae_lib.write_vertebrae(path, preds)


def _cpu() -> float:
  """CPU seconds of this process and of its finished children (the pipeline's workers)."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(repeats: int, fn, cpu: list[float] | None = None) -> float:
  """Least wall-clock seconds of ``repeats`` runs; appends the least CPU seconds to ``cpu``."""
  times, cpus = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), _cpu()
    fn()
    times.append(time.perf_counter() - t)
    cpus.append(_cpu() - c)
  if cpu is not None:
    cpu.append(min(cpus))
  return min(times)


def main(argv) -> int:
  cli_setup.begin(argv)
  num_studies, transfer_syntax = _NUM_STUDIES.value, _TRANSFER_SYNTAX.value
  workers, repeats = _WORKERS.value, _REPEATS.value

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if _DATA_DIR.value is None:
      data = tmp / "rsna"
      t = time.perf_counter()
      make_studies(data, num_studies, _SEED.value, transfer_syntax)
      print(f"generated {num_studies} full-size studies ({transfer_syntax}) in "
            f"{time.perf_counter() - t:.1f} s (not timed)")
    else:
      data = pathlib.Path(_DATA_DIR.value).resolve()
    train = labels_lib.read_train_csv(data / "train.csv")
    uids = [labels_lib.check_uid(u) for u in train["StudyInstanceUID"]]
    dirs = [data / "train_images" / u for u in uids]
    files = [f for d in dirs for f in sorted(d.glob("*.dcm"))]
    slices_of = {u: len(list(d.glob("*.dcm"))) for u, d in zip(uids, dirs)}
    vfile = None
    if (data / "ground_truth.json").exists():
      vfile = tmp / "vertebrae.csv"
      vertebrae_from_ground_truth(json.loads((data / "ground_truth.json").read_text()), vfile)
    n_seg = sum(n for u, n in slices_of.items() if study_lib.study_paths(data, u)[1])
    print(f"{len(uids)} studies, {len(files)} slices ({n_seg} in segmented studies); "
          f"{workers} workers, best of {repeats}")

    results, cpu = {}, {}  # slices/s (wall clock); CPU ms per slice, all processes together

    def timed(key, n, fn):
      spent: list[float] = []
      results[key] = n / best_of(repeats, fn, spent)
      cpu[key] = spent[0] * 1e3 / n

    timed("a", len(files), lambda: decode_floor(files))
    print(f"(a)  decode floor, 1 process:             {results['a']:8.1f} slices/s   "
          f"CPU {cpu['a']:.2f} ms/slice")
    if workers > 1:
      a_par = len(files) / best_of(repeats,
                                   lambda: decode_floor_parallel(files, workers))
      print(f"(a') decode floor, {workers} processes (info):    {a_par:8.1f} slices/s")
    opts = options_lib.Options()  # Paper defaults: 224 px, bone window, 24 slices per vertebra.
    run = [0]

    def prep(task, root, vertebrae=None):
      run[0] += 1
      m = pipeline.prepare(root, tmp / f"out{run[0]}", task, opts, vertebrae_file=vertebrae,
                           workers=workers, progress=False)
      if m["bad_studies"]:
        raise RuntimeError(f"bad studies in the benchmark: {m['bad_studies']}")
      return sum(slices_of[s["study_uid"]] for s in m["shards"])

    modes = []
    if vfile is not None:
      modes.append(("stage2 from --vertebrae", "stage2", without_masks(data, tmp / "nomasks"),
                    vfile))
    if n_seg:
      modes += [("stage2 from masks", "stage2", data, None), ("stage1", "stage1", data, None)]
    for name, task, root, vertebrae in modes:
      n = prep(task, root, vertebrae)  # Also warms the page cache and the imports.
      timed(name, n, lambda: prep(task, root, vertebrae))
      print(f"(b)  {name + ',':24s} {workers} workers: {results[name]:8.1f} slices/s   "
            f"CPU {cpu[name]:.2f} ms/slice")
    timed("c", len(files), lambda: notebook_loop(dirs))
    print(f"(c)  notebook loop, 1 process:            {results['c']:8.1f} slices/s   "
          f"CPU {cpu['c']:.2f} ms/slice")
    # Work per slice does not depend on how busy the machine is; wall-clock ratios do.
    for name, *_ in modes:
      print(f"CPU per slice, {name} / decode floor: {cpu[name] / cpu['a']:.2f} "
            f"(on {workers} idle cores, b/a ~ {workers} x balance / this)")
    for name, *_ in modes:
      print(f"b/a {name}: {results[name] / results['a']:.2f} (target >= {1 / 1.3:.2f})")
    for name, *_ in modes:
      print(f"b/c {name}: {results[name] / results['c']:.2f} (target >= 3)")
  return 0


if __name__ == "__main__":
  app.run(main)
