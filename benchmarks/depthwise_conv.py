"""Native vs shifted vs lax depthwise conv, and the whole ConvNeXt stage-2 model, on this backend.

Prints forward and forward+backward times of the 7x7 depthwise convs of a ConvNeXt (default atto
at the stage-2 CPU size: 16 vertebra samples x 8 images at 64 px; `--variant=tiny --size=224
--batch=2` is the paper size), then train / inference images/s of the stage-2 model (encoder +
BiLSTM + attention) for each formulation, measured in the same run, and ends with ratio lines.
"native" (the C++ kernels, `models/cpu/native.py`) is left out where they do not load. Train = a
plain `jax.jit`'d value_and_grad of a BCE loss over `nnx.split` state (no optimizer update). Each
figure is the best of `--repeats` timed calls.

  python benchmarks/depthwise_conv.py [--repeats=2] [--batch=16] [--size=64] [--variant=atto]
      [--skip_model]
"""
from __future__ import annotations

import pathlib
import sys
import time
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from cspine_jax.models import convnext, layers, sequence  # noqa: E402
from cspine_jax.models.cpu import native  # noqa: E402
from cspine_jax.train import runtime  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 2, "timed calls per figure (the best is kept)")
_BATCH = flags.DEFINE_integer("batch", 16, "vertebra samples (x8 images each)")
_SIZE = flags.DEFINE_integer("size", 64, "image size in pixels")
_VARIANT = flags.DEFINE_enum("variant", "atto", sorted(convnext.VARIANTS), "ConvNeXt size")
_SKIP_MODEL = flags.DEFINE_bool("skip_model", False, "only the convs, not the stage-2 model")

SEQ = 8
# PyTorch peer on this machine kind: ConvNeXt-atto stage-2 model at 64 px, batch 16x8.
TORCH_TRAIN_IMG_S = 447.0
TORCH_INFER_IMG_S = 1752.0


def best_time(fn: Callable[[], object], repeats: int) -> float:
  """Best wall time of `repeats` calls after one warm-up (compile) call."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def bench_convs(n: int, size: int, repeats: int, variant: str, methods: list[str]
                ) -> dict[str, tuple[float, float]]:
  """Forward and forward+backward time of all the variant's depthwise convs (one call per block)."""
  depths, dims = convnext.VARIANTS[variant]
  key = jax.random.key(0)
  xs, ks = [], []
  for stage, (depth, dim) in enumerate(zip(depths, dims)):
    hw = size // (4 * 2 ** stage)
    for _ in range(depth):
      key, k1, k2 = jax.random.split(key, 3)
      xs.append(jax.random.normal(k1, (n, hw, hw, dim)))
      ks.append(0.02 * jax.random.normal(k2, (7, 7, 1, dim)))
  out = {}
  for method in methods:
    def fwd(xs, ks, method=method):
      return [layers.depthwise_conv2d(x, k, padding=3, method=method) for x, k in zip(xs, ks)]

    def loss(xs, ks, method=method):
      return sum(jnp.sum(jnp.square(y)) for y in fwd(xs, ks, method))

    f = jax.jit(fwd)
    g = jax.jit(jax.grad(loss, argnums=(0, 1)))
    out[method] = (best_time(lambda: f(xs, ks), repeats), best_time(lambda: g(xs, ks), repeats))
  return out


def bench_model(batch: int, size: int, repeats: int, method: str, variant: str
                ) -> tuple[float, float]:
  """(train images/s, inference images/s) of the stage-2 model with `method` convs."""
  rngs = nnx.Rngs(params=jax.random.key(0, impl="rbg"), dropout=jax.random.key(1, impl="rbg"))
  enc = convnext.ConvNeXt(variant, drop_path_rate=0.1, dw_method=method, rngs=rngs)
  model = sequence.Stage2Model(enc, rngs=rngs)
  images = jax.random.normal(jax.random.key(2), (batch, SEQ, size, size, 3))
  labels = (jax.random.uniform(jax.random.key(3), (batch,)) > 0.5).astype(jnp.float32)

  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, x, y):
    m = nnx.merge(graphdef, params, rest, copy=True)
    loss = optax.sigmoid_binary_cross_entropy(m(x), y).mean()
    return loss, nnx.state(m, nnx.Not(nnx.Param))

  grad_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  state = {"rest": rest}

  def train_call():
    (loss, new_rest), grads = grad_step(params, state["rest"], images, labels)
    state["rest"] = new_rest
    return loss, grads

  model.eval()
  egraph, eparams, erest = nnx.split(model, nnx.Param, ...)
  infer = jax.jit(lambda p, r, x: nnx.merge(egraph, p, r)(x))
  n_img = batch * SEQ
  t_train = best_time(train_call, repeats)
  t_infer = best_time(lambda: infer(eparams, erest, images), repeats)
  return n_img / t_train, n_img / t_infer


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.start()  # as a run: the allocator setting and the native kernels
  batch, size, repeats, variant = _BATCH.value, _SIZE.value, _REPEATS.value, _VARIANT.value
  n = batch * SEQ
  methods = (["native"] if jax.default_backend() == "cpu" and native.loaded() else [])
  methods += ["shifted", "lax"]
  print(f"backend: {jax.default_backend()}  devices: {jax.device_count()}  images: {n} x "
        f"{size}px  variant: {variant}  repeats: {repeats}  methods: {methods}")

  convs = bench_convs(n, size, repeats, variant, methods)
  for method, (tf, tb) in convs.items():
    print(f"{variant}_depthwise_{method}: forward {tf * 1e3:.2f} ms  forward+backward "
          f"{tb * 1e3:.2f} ms")
  speed = {}
  if not _SKIP_MODEL.value:
    speed = {m: bench_model(batch, size, repeats, m, variant) for m in methods}
    for method, (tr, inf) in speed.items():
      print(f"{variant}_stage2_{method}: train {tr:.1f} images/s  inference {inf:.1f} "
            "images/s")
  pairs = [(m, "lax") for m in methods if m != "lax"]
  if "native" in methods:
    pairs.append(("native", "shifted"))
  for a, b in pairs:
    print(f"ratio_{a}_over_{b}_conv_forward: {convs[b][0] / convs[a][0]:.2f}")
    print(f"ratio_{a}_over_{b}_conv_backward: {convs[b][1] / convs[a][1]:.2f}")
    if speed:
      print(f"ratio_{a}_over_{b}_train: {speed[a][0] / speed[b][0]:.2f}")
      print(f"ratio_{a}_over_{b}_inference: {speed[a][1] / speed[b][1]:.2f}")
  if speed and (variant, batch, size) == ("atto", 16, 64):
    best = methods[0]
    print(f"ratio_{best}_over_torch_train: {speed[best][0] / TORCH_TRAIN_IMG_S:.2f}")
    print(f"ratio_{best}_over_torch_inference: {speed[best][1] / TORCH_INFER_IMG_S:.2f}")


if __name__ == "__main__":
  app.run(main)
