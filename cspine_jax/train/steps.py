"""jit-compiled train and eval steps over the split NNX state of (model, optimizer).

The graph definition is static (closed over); the state arrays go in and come out, the state is
donated, and ``out_shardings`` keep it laid out by the sharding rule (replicated or fsdp) while
batches are split over the 'data' axis. Semantics are those of ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` / ``optimizer.update(model, grads)``; only the Python-level graph traversal is
moved out of the hot loop.

Both steps take the loader's uint8 batches and compute the model's inputs themselves
(``inputs.augment.device_inputs``): the train step augments (one random rotation + flip per sample, drawn
from a key folded from the seed and the optimizer step, so a resumed run draws what an unbroken
one did), both normalise.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from cspine_jax.inputs import augment as augment_lib
from cspine_jax.train import sharding as sharding_lib
from cspine_jax.train.tasks import Task


SCHEDULES = ("warmup_cosine", "cosine_restarts")


def make_schedule(lr: float, total_steps: int, warmup_steps: int, end_factor: float = 0.0, *,
                  kind: str = "warmup_cosine", steps_per_epoch: int | None = None,
                  restart_epochs: float = 5, min_lr: float = 1e-6,
                  per_epoch: bool = True) -> optax.Schedule:
  """The learning rate of each optimizer step.

  ``"warmup_cosine"``: linear warmup to ``lr`` then cosine decay to ``lr * end_factor`` at
  ``total_steps``. ``"cosine_restarts"`` (torch's CosineAnnealingWarmRestarts, T_mult 1, the
  seed's): a cosine from ``lr`` to ``min_lr`` over ``restart_epochs`` epochs of
  ``steps_per_epoch`` steps, then from ``lr`` again; ``per_epoch`` holds each epoch's rate for
  all its steps, as the seed steps its scheduler once an epoch (else it moves every step).
  """
  if kind == "cosine_restarts":
    if not steps_per_epoch or steps_per_epoch < 1 or restart_epochs <= 0:
      raise ValueError("cosine_restarts needs steps_per_epoch >= 1 and restart_epochs > 0, got "
                       f"{steps_per_epoch}, {restart_epochs}")
    period = float(restart_epochs) * steps_per_epoch

    def restarts(step):
      t = jnp.asarray(step, jnp.float32)
      if per_epoch:
        t = jnp.floor(t / steps_per_epoch) * steps_per_epoch
      phase = jnp.mod(t, period) / period
      return min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * phase))

    return restarts
  if kind != "warmup_cosine":
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
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


# YNNPACK dot fusions off (they materialise the depthwise conv's taps), 512-bit vectors where the
# host has them, LLVM at -O1 (cold compiles dominate short runs); per-jit, nothing global changes.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
                        "xla_cpu_prefer_vector_width": 512,
                        "xla_backend_optimization_level": 1}


def compiler_options(platform: str) -> dict[str, Any] | None:
  """The XLA options the train/eval steps compile with on ``platform`` (None: XLA's defaults)."""
  return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


AUGMENT_STREAM = 0x617567  # "aug"


class Trainer:
  """Holds the (graphdef, state) of model + optimizer and the compiled steps.

  ``state`` is an ``nnx.State`` laid out over ``mesh``; ``train_step(state, batch)`` returns
  ``(new_state, metrics)`` and donates the old state; ``eval_step(state, batch)`` returns
  (predictions + carried fields, metrics), replicated so every host can read the whole batch.
  ``augment`` (None: none) is applied by the train step only, with draws keyed by
  (``augment_seed``, optimizer step).
  """

  def __init__(self,
               model: nnx.Module,
               tx: optax.GradientTransformation,
               task: Task,
               mesh: Mesh,
               param_rule: str = "replicated",
               augment: augment_lib.AugmentOptions | None = None,
               augment_seed: int = 0):
    self.task = task
    self.mesh = mesh
    self.augment = augment
    self.augment_seed = int(augment_seed)
    model.train()  # stochastic layers on; the eval step switches them off in its own copy
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.graphdef, state = nnx.split((model, optimizer))
    self.state_shardings = sharding_lib.state_shardings(state, mesh, param_rule)
    # Every process built the same state; check it, then each lays out its own devices' part.
    sharding_lib.check_same_on_every_process(state, "the initial model/optimizer states")
    self.state = sharding_lib.put(state, self.state_shardings)
    rep = sharding_lib.replicated(mesh)
    opts = compiler_options(mesh.devices.flat[0].platform)
    # Two programs: the inputs are made (augmented, normalised) by their own small jit, so XLA
    # materialises them once instead of recomputing the rotation's gather in the backward.
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
    return augment_lib.device_inputs(batch, self.task.input_field, key=key, augment=self.augment)

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
    batch = augment_lib.device_inputs(batch, self.task.input_field)
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
