"""Orbax checkpoints of a training run: model + optimizer state, step, RNG and the grain iterator.

One ``ocp.CheckpointManager`` per run directory saves, per step, three items together:
``state`` (every array of the split (model, optimizer) NNX state as a flat name -> array dict, RNG
keys as their raw key data), ``data`` (the grain iterator state, one JSON file per process) and
``meta`` (JSON: step, epoch, task, model config, best score so far). It keeps the last ``keep``
checkpoints plus the ``keep_best`` best by validation score, and saves asynchronously (every read
waits for a pending save first). Before restoring, the saved array names and shapes are compared
with the target, so a checkpoint of another model fails with a message that lists the differences.

:func:`restore_model` is the inference-side reader: the model alone (no optimizer, no iterator),
rebuilt from the config saved in the meta.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

STATE, DATA, META = "state", "data", "meta"


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model/optimizer being restored into."""


class NoCheckpointError(FileNotFoundError):
  """A run folder without any saved checkpoint."""


def _path_key(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return ".".join(parts)


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _fresh(abstract: jax.ShapeDtypeStruct) -> jax.Array:
  """A concrete RNG leaf for an abstract one of ``nnx.Rngs(0)``: default-impl keys, zero counts."""
  if _is_key(abstract):
    keys = jax.random.split(jax.random.key(0), max(math.prod(abstract.shape), 1))
    return keys[0] if abstract.shape == () else keys.reshape(abstract.shape)
  return jnp.zeros(abstract.shape, abstract.dtype)


def flatten_state(state: Any) -> dict[str, Any]:
  """name -> array for every leaf of an NNX state (typed PRNG keys -> their uint32 key data)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  out = {}
  for path, x in leaves:
    out[_path_key(path)] = jax.random.key_data(x) if _is_key(x) else x
  return out


def unflatten_state(flat: Mapping[str, Any], like: Any) -> Any:
  """Inverse of :func:`flatten_state` into the structure (and key types) of ``like``."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  new = []
  for path, x in leaves:
    v = flat[_path_key(path)]
    new.append(jax.random.wrap_key_data(v, impl=jax.random.key_impl(x)) if _is_key(x) else v)
  return jax.tree_util.tree_unflatten(treedef, new)


def _abstract(flat: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
          for k, v in flat.items()}


@dataclasses.dataclass
class _FrozenIterator:
  """The iterator state captured at save time (the live iterator moves on during an async save)."""
  state: bytes

  def get_state(self) -> bytes:
    return self.state


class Checkpointer:
  """Saves/restores training checkpoints under ``directory`` (see the module docstring)."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, keep_best: int = 1,
               best_mode: str = "min", async_save: bool = True):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    self.directory = pathlib.Path(directory).absolute()
    self.best_mode = best_mode
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=lambda m: m["score"], reverse=best_mode == "min", n=keep_best,
                  keep_checkpoints_without_metrics=False),
    ])
    # best_fn also makes orbax write each checkpoint's metrics, so BestN still knows the scores
    # after a restart.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           best_fn=lambda m: m["score"], best_mode=best_mode,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, iterator: Any, meta: Mapping[str, Any],
           score: float | None = None) -> None:
    """Starts saving (asynchronously) ``state``, the iterator position and ``meta`` at ``step``."""
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(flatten_state(state)),
        DATA: grain.checkpoint.CheckpointSave(_FrozenIterator(iterator.get_state())),
        META: ocp.args.JsonSave(dict(meta, step=int(step))),
    })
    metrics = None if score is None else {"score": float(score)}
    self.manager.save(int(step), args=args, metrics=metrics, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    self.wait()
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best validation score (None when no checkpoint has a score)."""
    self.wait()
    scored = []
    for step in self.manager.all_steps():
      m = self.manager.metrics(step)
      if m and m.get("score") is not None:
        scored.append((float(m["score"]), step))
    if not scored:
      return None
    return (min(scored) if self.best_mode == "min" else max(scored))[1]

  def read_meta(self, step: int) -> dict[str, Any]:
    self.wait()
    return dict(self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

  def check_compatible(self, step: int, target_state: Any) -> None:
    """Raises CheckpointMismatchError unless the saved arrays match ``target_state`` by name/shape."""
    saved = self.manager.item_metadata(step)[STATE]
    if saved is None:
      raise CheckpointMismatchError(f"{self.directory}/{step}: no model state saved")
    saved_shapes = {k: tuple(v.shape) for k, v in dict(saved).items()}
    want = {k: tuple(v.shape) for k, v in flatten_state(target_state).items()}
    missing = sorted(set(want) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(want))
    shapes = sorted(k for k in set(want) & set(saved_shapes) if want[k] != saved_shapes[k])
    if missing or extra or shapes:
      lines = [f"{self.directory}/{step} holds a checkpoint of another model/optimizer "
               f"({len(saved_shapes)} arrays saved, {len(want)} expected):"]
      if shapes:
        lines.append("  shape differs: " + ", ".join(
            f"{k} saved {saved_shapes[k]} vs model {want[k]}" for k in shapes[:5]))
      if missing:
        lines.append(f"  not in the checkpoint: {missing[:5]}")
      if extra:
        lines.append(f"  only in the checkpoint: {extra[:5]}")
      try:
        meta = self.read_meta(step)
        lines.append(f"  saved task {meta.get('task')!r}, model {meta.get('model')}")
      except Exception:  # pylint: disable=broad-except  # the message is complete without it
        pass
      lines.append("  use another --workdir or the matching config")
      raise CheckpointMismatchError("\n".join(lines))

  def restore(self, step: int, target_state: Any, iterator: Any | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """(state laid out like ``target_state``, meta); sets ``iterator`` to the saved position."""
    self.wait()
    self.check_compatible(step, target_state)
    items = {STATE: ocp.args.StandardRestore(_abstract(flatten_state(target_state))),
             META: ocp.args.JsonRestore()}
    if iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return unflatten_state(restored[STATE], target_state), dict(restored[META])

  def close(self) -> None:
    self.wait()
    self.manager.close()


def restore_model(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[Any, dict[str, Any]]:
  """(model in eval mode, checkpoint meta with "step") of one training run folder.

  ``step`` None: the best-scored kept step, else the latest. The model is rebuilt from the config
  saved in the checkpoint's meta (``models.make_model``) and only its arrays are read from the
  saved (model, optimizer) state; RNG streams are fresh (inference draws no randomness and
  their saved layout may differ). The model is built abstractly (``nnx.eval_shape``): a random
  init would cost one small XLA compile per parameter (~10 s per model on 2 CPU cores) only to
  be overwritten. Raises NoCheckpointError / CheckpointMismatchError.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from cspine_jax import models  # pylint: disable=g-import-not-at-top

  run_dir = pathlib.Path(run_dir)
  ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    step = step if step is not None else ckpt.best_step()
    step = step if step is not None else ckpt.latest_step()
    if step is None:
      raise NoCheckpointError(f"{run_dir}/checkpoints: no checkpoint saved")
    meta = ckpt.read_meta(step)
    model_cfg = ml_collections.ConfigDict(meta["model"])
    model = nnx.eval_shape(lambda: models.make_model(model_cfg, rngs=nnx.Rngs(0)))
    saved = dict(ckpt.manager.item_metadata(step)[STATE])
    abstract = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in saved.items()}
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract)}))[STATE]
  finally:
    ckpt.close()
  # The trainer saved nnx.state((model, optimizer)): the model's arrays are the "0." entries.
  flat = {k[2:]: v for k, v in restored.items() if k.startswith("0.")}
  like = nnx.state(model, nnx.Not(nnx.RngState))
  missing = set(flatten_state(like)) - set(flat)
  if missing:
    raise CheckpointMismatchError(f"{run_dir}: checkpoint step {step} lacks {sorted(missing)[:5]} "
                                  f"for model {meta.get('model')}")
  graphdef, rng_state, _ = nnx.split(model, nnx.RngState, ...)
  model = nnx.merge(graphdef, jax.tree.map(_fresh, rng_state), unflatten_state(flat, like))
  model.eval()
  return model, dict(meta, step=step)
