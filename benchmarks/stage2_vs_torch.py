"""Stage-2 atto model on CPU: our jit-compiled train/eval steps vs the seed's PyTorch model.

    python benchmarks/stage2_vs_torch.py [--steps=6] [--batch=16] [--size=64]
        [--encoder=convnext_atto] [--torch_python=PATH] [--ours_only] [--rounds=1]

Ours: the project's own ``Trainer`` (``loop.make_trainer`` on ``configs/stage2.py`` with the
encoder, image size and batch set here): a train step is forward + backward + global-norm clip +
AdamW on the whole state; inference is the eval step (model in eval mode). The peer: timm
``convnext_atto`` (drop path 0.1) + ``nn.LSTM`` (bidirectional, hidden = encoder width) + MLP
attention pooling (tanh, softmax over the 8 images) + dropout 0.1 + a linear head, random weights,
BCE-with-logits, ``clip_grad_norm_(1.0)`` + ``torch.optim.AdamW``; inference under
``torch.inference_mode()``.
Both get a batch of ``batch`` vertebra samples x 8 images of ``size`` px.

The peer runs in this process when ``torch`` and ``timm`` import, else under ``--torch_python``
(another interpreter, e.g. a scratch venv with torch CPU + timm + absl-py) as a subprocess, else
the issue's reference figures for this machine kind (447 / 1752 images/s, torch 2.13 CPU, 2 cores)
stand in. Ours runs in a process set up as a run sets it up (``train.runtime.start``). Each figure
is the median of ``--steps`` timed calls after two warm-up calls; our first call of each step
(compile + one run) is printed too. Ends with the ratios. With ``--rounds K`` the peer and ours
are measured K times in turn (ours compiled once) and the ratio of each round and their median are
printed: this machine's speed drifts by +-15% over minutes, so a ratio from one pair of
measurements minutes apart says little.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Callable

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ = 8

_STEPS = flags.DEFINE_integer("steps", 6, "timed calls per figure (their median is kept)")
_BATCH = flags.DEFINE_integer("batch", 16, "vertebra samples (x8 images each)")
_SIZE = flags.DEFINE_integer("size", 64, "image size in pixels")
_ENCODER = flags.DEFINE_string("encoder", "convnext_atto", "image encoder (timm name for the peer)")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", os.environ.get("CSPINE_TORCH_PYTHON"),
    "an interpreter with torch + timm + absl-py for the peer (default $CSPINE_TORCH_PYTHON)")
_OURS_ONLY = flags.DEFINE_bool("ours_only", False, "measure ours only, not the PyTorch peer")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "measure the peer and ours this many times in turn; "
                               "report each round's ratio and their median", lower_bound=1)
_PEER_ONLY = flags.DEFINE_bool("peer_only", False,
                               "internal: measure the peer only and print one JSON line")
# The PyTorch figures on this machine kind (atto at 64 px, batch 16 x 8 images).
REFERENCE = {"train": 447.0, "inference": 1752.0}


def median_time(fn: Callable[[], object], steps: int, sync: Callable[[object], object]) -> float:
  """Median seconds of `steps` calls of fn after two warm-up calls (compilation, allocation)."""
  for _ in range(2):
    sync(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


# ---- the PyTorch peer ----------------------------------------------------------------------------
def _import_torchvision() -> None:
  """Imports torchvision (timm needs it), also where its C++ ops do not load against this torch.

  A CUDA torchvision wheel beside a CPU torch (as in the scratch venv after its last rebuild)
  fails to load its ops and then stops at registering fake kernels for two ops it never defined
  (``torchvision::nms``, ``qnms``). Defining their schemas first lets the pure-Python parts that
  timm imports load; the peer uses no torchvision op, so its timing is unaffected.
  """
  import torch  # lazy: optional dependency (torch)
  try:
    import torchvision  # noqa: F401  # lazy: optional dependency (torch)
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=no-member
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.lib = lib  # keep the definitions alive
    import torchvision  # noqa: F401,F811  # lazy: optional dependency (torch)


def torch_peer(batch: int, size: int, steps: int, encoder: str) -> dict[str, float]:
  """(train, inference) images/s of the seed's PyTorch stage-2 model with random weights."""
  import torch  # lazy: optional dependency (torch)
  _import_torchvision()
  import timm  # lazy: optional dependency (torch)
  from torch import nn  # lazy: optional dependency (torch)

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)

  class Peer(nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = timm.create_model(encoder, pretrained=False, num_classes=0,
                                       drop_path_rate=0.1)
      f = self.encoder.num_features
      self.lstm = nn.LSTM(f, f, batch_first=True, bidirectional=True)
      self.attention = nn.Sequential(nn.Linear(2 * f, 2 * f), nn.Tanh(), nn.Linear(2 * f, 1))
      self.dropout = nn.Dropout(0.1)
      self.head = nn.Linear(2 * f, 1)

    def forward(self, x):
      b, t = x.shape[:2]
      feats = self.encoder(x.flatten(0, 1)).view(b, t, -1)
      seq, _ = self.lstm(feats)
      w = torch.softmax(self.attention(seq).squeeze(-1), dim=1)
      pooled = (w.unsqueeze(-1) * seq).sum(1)
      return self.head(self.dropout(pooled)).squeeze(-1)

  model = Peer()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
  loss_fn = nn.BCEWithLogitsLoss()
  x = torch.randn(batch, SEQ, 3, size, size)
  y = (torch.rand(batch) > 0.5).float()

  def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  def infer():
    model.eval()
    with torch.inference_mode():
      return model(x)

  n = batch * SEQ
  return {"train": n / median_time(train, steps, lambda v: v),
          "inference": n / median_time(infer, steps, lambda v: v),
          "torch": torch.__version__, "threads": torch.get_num_threads()}


def peer_figures(batch: int, size: int, steps: int, encoder: str, torch_python: str | None
                 ) -> tuple[dict, str]:
  """The peer's figures and where they come from."""
  try:
    import timm  # noqa: F401  # lazy: optional dependency (torch)
    import torch  # noqa: F401  # lazy: optional dependency (torch)
    return torch_peer(batch, size, steps, encoder), "measured (this process)"
  except ImportError:
    pass
  if torch_python:
    cmd = [torch_python, __file__, "--peer_only", f"--batch={batch}", f"--size={size}",
           f"--steps={steps}", f"--encoder={encoder}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]), f"measured ({torch_python})"
  if (encoder, batch, size) != ("convnext_atto", 16, 64):
    raise SystemExit("no torch here and no reference figures for this size: pass --torch_python")
  return dict(REFERENCE), "the issue's reference figures (torch not importable)"


# ---- ours ----------------------------------------------------------------------------------------
def ours(batch: int, size: int, steps: int, encoder: str) -> Callable[[], dict]:
  """A function measuring (train, inference) images/s of the project's stage-2 Trainer steps on
  one CPU device; the steps are compiled (and the compile times recorded) on its first call."""
  sys.path.insert(0, str(REPO))
  import jax  # lazy: the --peer_only run (under --torch_python) may have no jax
  import numpy as np  # lazy: as jax

  from benchmarks import timing  # lazy: as jax
  from cspine_jax.train import loop, runtime, sharding  # lazy: as jax
  from configs import stage2  # lazy: as jax

  runtime.start()  # as a run: the allocator setting and the native kernels

  config = stage2.get_config()
  config.model.encoder = encoder
  config.prepare.image_size = (size, size)
  config.input.batch_size = batch
  config.input.augment.enabled = False  # the peer gets no augmentation either
  mesh = sharding.make_mesh()
  trainer = loop.make_trainer(config, 1000, mesh, seed=0)
  rng = np.random.default_rng(0)
  # uint8 pixels, as the loader hands them over (the steps normalise on the device).
  host = {"images": rng.integers(0, 256, (batch, SEQ, size, size, 3), dtype=np.uint8),
          "label": (rng.random(batch) < 0.5).astype(np.float32),
          "vertebra": (np.arange(batch) % 7).astype(np.int32),
          "record_id": np.arange(batch, dtype=np.int32)}
  train_batch = sharding.shard_batch(host, mesh)
  eval_batch = sharding.shard_batch(dict(host, mask=np.ones(batch, np.float32)), mesh)

  def train():
    trainer.state, metrics = trainer.train_step(trainer.state, train_batch)
    return metrics["loss"]

  def infer():
    return trainer.eval_step(trainer.state, eval_batch)[0]

  compile_s = {}

  def measure() -> dict:
    if not compile_s:
      compile_s.update(train=timing.first_call(train), inference=timing.first_call(infer))
    n = batch * SEQ
    return {"train": n / median_time(train, steps, jax.block_until_ready),
            "inference": n / median_time(infer, steps, jax.block_until_ready),
            "compile_s": dict(compile_s),
            "jax": jax.__version__, "devices": f"{jax.device_count()} x {jax.default_backend()}"}

  return measure


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batch, size, steps, encoder = _BATCH.value, _SIZE.value, _STEPS.value, _ENCODER.value
  if _PEER_ONLY.value:  # run by peer_figures() under --torch_python: one JSON line
    print(json.dumps(torch_peer(batch, size, steps, encoder)))
    return
  rounds = _ROUNDS.value
  print(f"{encoder} stage-2 model, {batch} x {SEQ} images of {size} px, "
        f"{os.cpu_count()} CPUs, median of {steps} steps")
  measure_ours = ours(batch, size, steps, encoder)
  ratios = {"train": [], "inference": []}
  for r in range(rounds):
    tag = f"round {r + 1}/{rounds}: " if rounds > 1 else ""
    peer, origin = ((None, "") if _OURS_ONLY.value
                    else peer_figures(batch, size, steps, encoder, _TORCH_PYTHON.value))
    mine = measure_ours()
    print(f"{tag}ours ({mine['jax']}, {mine['devices']}): train {mine['train']:.1f} images/s, "
          f"inference {mine['inference']:.1f} images/s" + ("" if r else
          f"; first call (compile + run) train {mine['compile_s']['train']:.1f} s, inference "
          f"{mine['compile_s']['inference']:.1f} s"), flush=True)
    if peer is None:
      continue
    print(f"{tag}torch peer, {origin}: train {peer['train']:.1f} images/s, "
          f"inference {peer['inference']:.1f} images/s", flush=True)
    for kind in ratios:
      ratios[kind].append(mine[kind] / peer[kind])
    if rounds > 1:
      print(f"{tag}ratio train {ratios['train'][-1]:.2f}, inference "
            f"{ratios['inference'][-1]:.2f}", flush=True)
  for kind, values in ratios.items():
    if values:
      spread = f" (rounds {min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
      print(f"ratio_ours_over_torch_{kind}: {statistics.median(values):.2f}{spread}")


if __name__ == "__main__":
  app.run(main)
