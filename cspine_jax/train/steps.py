"""jit-compiled train and eval steps over the split NNX state of (model, optimizer).

The graph definition is static (closed over); the state arrays go in and come out, the state is
donated, and ``out_shardings`` keep it laid out by the sharding rule (replicated or fsdp) while
batches are split over the 'data' axis. Semantics are those of ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` / ``optimizer.update(model, grads)``; only the Python-level graph traversal is
moved out of the hot loop.

Both steps take the loader's uint8 batches and compute the model's inputs themselves
(``input.device_inputs``): the train step augments (one random rotation + flip per sample, drawn
from a key folded from the seed and the optimizer step, so a resumed run draws what an unbroken
one did), both normalise.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from cspine_jax import input as input_lib
from cspine_jax.train import sharding as sharding_lib
from cspine_jax.train.tasks import Task


def make_schedule(lr: float, total_steps: int, warmup_steps: int, end_factor: float = 0.0
                  ) -> optax.Schedule:
  """Linear warmup to ``lr`` then cosine decay to ``lr * end_factor`` at ``total_steps``."""
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else lr, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=lr * end_factor)


def make_tx(schedule: optax.Schedule, *, weight_decay: float, clip_norm: float | None,
            b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """AdamW with global-norm gradient clipping (clip first, like torch's clip_grad_norm_)."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*parts)


# XLA:CPU (jax 0.10) hands dots and the elementwise work around them to YNNPACK fusions by
# default; for ConvNeXt that pulls the 49-tap depthwise conv, LayerNorm and bias adds into YNNPACK
# graphs that materialise every tap and broadcast. With them off, XLA's own loop fusions run that
# work and Eigen the dots: atto stage-2 forward ~350 -> ~240 ms at 16x8 images of 64 px
# (benchmarks/stage2_vs_torch.py). Per-jit options, so nothing global changes.
# 512-bit vectors (AVX-512 hosts; others ignore it): stage2_vs_torch --ours_only, 3 alternating
# pairs, train 156/155/153 vs 152/142/129 img/s, inference 1003/1109/804 vs 746/929/1004.
# LLVM at -O1 instead of -O2: cold compiles are the larger cost of short runs (a 2D baseline's
# first train step 13.0 -> 9.6 s and 26.0 -> 21.5 s; whole fold 26.5 -> 21.0 s and 53.8 -> 45.4 s)
# and the steps did not get slower: stage2_vs_torch --ours_only, 2 alternating pairs, atto train
# 140/143 vs 134/130 img/s, inference 899/736 vs 718/811; the demo's test encoder train 2370/2168
# vs 1860/1878, inference 10240/10562 vs 11579/13502.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
                        "xla_cpu_prefer_vector_width": 512,
                        "xla_backend_optimization_level": 1}


def compiler_options(platform: str) -> dict[str, Any] | None:
  """The XLA options the train/eval steps compile with on ``platform`` (None: XLA's defaults).
  On CPU this also keeps freed host memory in the process (:func:`keep_freed_host_memory`)."""
  if platform != "cpu":
    return None
  keep_freed_host_memory()
  return dict(CPU_COMPILER_OPTIONS)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_host_memory() -> bool:
  """glibc: large blocks from the heap, and freed memory kept for the next step (process-wide,
  once; False where the C library is not glibc).

  XLA:CPU allocates each step's scratch buffer afresh (62 MB in the atto stage-2 eval step).
  Above 32 MB glibc always maps such a block and unmaps it when freed, so every step page-faulted
  it in again: ~15,000 faults, a third of the eval step's time. Served from a heap that is not
  trimmed, the next step reuses the pages. benchmarks/stage2_vs_torch.py --ours_only, alternating
  runs: inference 1576/1552/1549 vs 1377/1362 img/s, train 333/337/323 vs 332/330 (unchanged).
  The cost: the process keeps its peak host memory until it exits.
  """
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
  except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator as it is
    return False


AUGMENT_STREAM = 0x617567  # "aug"


class Trainer:
  """Holds the (graphdef, state) of model + optimizer and the compiled steps.

  ``state`` is an ``nnx.State`` laid out over ``mesh``; ``train_step(state, batch)`` returns
  ``(new_state, metrics)`` and donates the old state; ``eval_step(state, batch)`` returns
  (predictions + carried fields, metrics), replicated so every host can read the whole batch.
  ``augment`` (None: none) is applied by the train step only, with draws keyed by
  (``augment_seed``, optimizer step).
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, task: Task, mesh: Mesh,
               param_rule: str = "replicated", augment: input_lib.AugmentOptions | None = None,
               augment_seed: int = 0):
    self.task = task
    self.mesh = mesh
    self.augment = augment
    self.augment_seed = int(augment_seed)
    model.train()  # stochastic layers on; the eval step switches them off in its own copy
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.graphdef, state = nnx.split((model, optimizer))
    self.state_shardings = sharding_lib.state_shardings(state, mesh, param_rule)
    self.state = jax.device_put(state, self.state_shardings)
    rep = sharding_lib.replicated(mesh)
    opts = compiler_options(mesh.devices.flat[0].platform)
    # Two programs: the inputs are made (augmented, normalised) by their own small jit, so XLA
    # materialises them once; fused into the update step, XLA:CPU recomputed the rotation's
    # gather in the first layer's forward and in its backward (stage-2 :cpu step 30 -> 49 ms).
    self.prepare_step = jax.jit(self._prepare, compiler_options=opts)
    self.update_step = jax.jit(self._update, donate_argnums=0,
                               out_shardings=(self.state_shardings, rep), compiler_options=opts)
    self.eval_step = jax.jit(self._eval_step, out_shardings=rep, compiler_options=opts)

  def _mask(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    x = batch[self.task.input_field]
    return batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(x.shape[:1], jnp.float32)

  def augment_key(self, step: jax.Array | int) -> jax.Array:
    """The augmentation key of the step that follows ``step`` optimizer updates."""
    # Its own stream: nnx.Rngs(seed) draws fold_in(key(seed), n) for the initial parameters.
    stream = jax.random.fold_in(jax.random.key(self.augment_seed), AUGMENT_STREAM)
    return jax.random.fold_in(stream, step)

  def train_step(self, state: nnx.State, batch: Mapping[str, jax.Array]):
    """One training step on a loader batch: ``(new_state, metrics)``; ``state`` is donated."""
    return self.update_step(state, self.prepare_step(optimizer_step(state), batch))

  def _prepare(self, step: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The model inputs of the step after ``step`` updates: augmented (when on), normalised."""
    key = None if self.augment is None else self.augment_key(step)
    return input_lib.device_inputs(batch, self.task.input_field, key=key, augment=self.augment)

  def _update(self, state: nnx.State, batch: Mapping[str, jax.Array]):
    model, optimizer = nnx.merge(self.graphdef, state)
    mask = self._mask(batch)
    x, kwargs = self.task.model_inputs(batch)

    def loss_fn(m):
      outputs = m(x, **kwargs)
      return self.task.loss(outputs, batch, mask)

    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics

  def _eval_step(self, state: nnx.State, batch: Mapping[str, jax.Array]):
    model, _ = nnx.merge(self.graphdef, state)
    model.eval()
    mask = self._mask(batch)
    batch = input_lib.device_inputs(batch, self.task.input_field)
    x, kwargs = self.task.model_inputs(batch)
    outputs = model(x, **kwargs)
    _, metrics = self.task.loss(outputs, batch, mask)
    result = dict(self.task.predict(outputs))
    for k in self.task.carry + ("record_id",):
      result[k] = batch[k]
    result["mask"] = mask
    return result, metrics

  @property
  def step(self) -> int:
    """The optimizer's step count (host int)."""
    return int(optimizer_step(self.state))

  def model(self) -> nnx.Module:
    """The current model (a merged copy, in eval mode) for inference outside the steps."""
    model, _ = nnx.merge(self.graphdef, self.state)
    model.eval()
    return model


def optimizer_step(state: nnx.State) -> jax.Array:
  """The optimizer's step counter inside the split (model, optimizer) state (no host copy)."""
  step = state[1]["step"]
  return step.value if hasattr(step, "value") else step


def abstract_state(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a state, for restoring a checkpoint into its layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
