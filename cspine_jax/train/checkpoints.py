"""Orbax checkpoints of a training run: model + optimizer state, step, RNG and the grain iterator.

One ``ocp.CheckpointManager`` per run directory saves, per step, three items together:
``state`` (the split (model, optimizer) NNX state as orbax's nested pytree: ``nnx.to_pure_dict``,
RNG keys stored by orbax as their key data), ``data`` (the grain iterator state, one JSON file per
process) and ``meta`` (JSON: step, epoch, task, model config, best score so far). With several
JAX processes every process calls save and restore: each writes its part of the state and its
iterator file, process 0 the meta; a checkpoint written by one number of processes restores in
another (the state is resharded; the input position is that of the global batches, the same in
every process, see ``inputs.loader``). It keeps the
last ``keep`` checkpoints plus the ``keep_best`` best by validation score, and saves
asynchronously (every read waits for a pending save first). Before restoring, the saved array
names and shapes are compared with the target, so a checkpoint of another model fails with a
message that lists the differences.

:func:`restore_model` is the inference-side reader: the model alone (no optimizer, no iterator),
rebuilt from the config saved in the meta, reading only the model's part of the saved state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocm

from cspine_jax import models

STATE, DATA, META = "state", "data", "meta"
# The trainer saves nnx.state((model, optimizer)): the model is the state's first entry.
MODEL_PART = 0


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model/optimizer being restored into."""


class NoCheckpointError(FileNotFoundError):
  """A run folder without any saved checkpoint."""


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _fresh(abstract: jax.ShapeDtypeStruct) -> jax.Array:
  """A concrete RNG leaf for an abstract one of ``nnx.Rngs(0)``: default-impl keys, zero counts."""
  if _is_key(abstract):
    keys = jax.random.split(jax.random.key(0), max(math.prod(abstract.shape), 1))
    return keys[0] if abstract.shape == () else keys.reshape(abstract.shape)
  return jnp.zeros(abstract.shape, abstract.dtype)


def _abstract(tree: Any, shardings: bool = True) -> Any:
  """ShapeDtypeStructs of ``tree``'s arrays (with their shardings: orbax restores into them)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None) if shardings else None), tree)


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restores the arrays of ``abstract`` (a pure dict) into its shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial)


def _stored_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Dotted name (``0.conv.kernel``) -> shape as stored (a typed RNG key array: its key data)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_key(x):
      x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    out[jax.tree_util.keystr(path, simple=True, separator=".")] = tuple(x.shape)
  return out


def _differences(saved: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]],
                 part: bool) -> list[str]:
  """Lines naming the arrays missing, extra (unless reading a ``part``) or of another shape."""
  missing = sorted(set(want) - set(saved))
  extra = [] if part else sorted(set(saved) - set(want))
  shapes = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
  lines = []
  if shapes:
    lines.append("  shape differs: " + ", ".join(
        f"{k} saved {saved[k]} vs model {want[k]}" for k in shapes[:5]))
  if missing:
    lines.append(f"  not in the checkpoint: {missing[:5]}")
  if extra:
    lines.append(f"  only in the checkpoint: {extra[:5]}")
  return lines


@dataclasses.dataclass
class _FrozenIterator:
  """The iterator state captured at save time (the live iterator moves on during an async save),
  as the JSON bytes grain's handler writes."""
  state: bytes

  def get_state(self) -> bytes:
    return self.state


def _frozen(iterator: Any) -> _FrozenIterator:
  state = iterator.get_state()
  if not isinstance(state, bytes):  # a grain DatasetIterator's state is a JSON-able dict
    state = json.dumps(state, indent=4).encode()
  return _FrozenIterator(state)


class IteratorHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler (``process_<i>-of-<n>.json`` per process) that also restores a checkpoint of
  another process count: the saved position counts global batches, so process 0's file stands
  for every process (the iterator itself refuses a position of other batches)."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    index, count = jax.process_index(), jax.process_count()
    if (pathlib.Path(directory) / f"process_{index}-of-{count}.json").exists():
      return super().restore(directory, item=item)
    saved = sorted(pathlib.Path(directory).glob("process_0-of-*.json"))
    if not saved:
      raise FileNotFoundError(f"{directory}: no saved input position (process_0-of-N.json)")
    item.set_state(json.loads(saved[0].read_text()))
    item.start_prefetch()  # as grain's own restore does
    return item


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any


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
        # The pytree handler (not the standard one) can also read a part: restore_model.
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                       DATA: IteratorHandler(),
                       META: ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, iterator: Any, meta: Mapping[str, Any],
           score: float | None = None) -> None:
    """Starts saving (asynchronously) ``state``, the iterator position and ``meta`` at ``step``."""
    args = ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave(nnx.to_pure_dict(state)),
        DATA: IteratorSave(_frozen(iterator)),
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

  def selected_step(self) -> int | None:
    """The step that stands for the run (``train.select`` in the latest meta), None if none."""
    latest = self.latest_step()
    if latest is None:
      return None
    if self.read_meta(latest).get("select", "best") == "last":
      return latest
    best = self.best_step()
    return latest if best is None else best

  def read_meta(self, step: int) -> dict[str, Any]:
    self.wait()
    return dict(self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """Dotted name -> shape of every array in the state saved at ``step``."""
    saved = self.manager.item_metadata(step)[STATE]
    if saved is None:
      raise CheckpointMismatchError(f"{self.directory}/{step}: no model state saved")
    return _stored_shapes(getattr(saved, "tree", saved))

  def check_compatible(self, step: int, target_state: Any) -> None:
    """CheckpointMismatchError unless the saved arrays match ``target_state`` by name and shape."""
    saved = self.saved_shapes(step)
    want = _stored_shapes(nnx.to_pure_dict(target_state))
    lines = _differences(saved, want, part=False)
    if lines:
      lines.insert(0, f"{self.directory}/{step} holds a checkpoint of another model/optimizer "
                      f"({len(saved)} arrays saved, {len(want)} expected):")
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
    abstract = _abstract(target_state)
    items = {STATE: _restore_args(nnx.to_pure_dict(abstract)), META: ocp.args.JsonRestore()}
    if iterator is not None:
      items[DATA] = IteratorRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(abstract, restored[STATE])
    return abstract, dict(restored[META])

  def restore_part(self, step: int, part: Mapping[Any, Any]) -> Any:
    """Reads only the arrays of ``part`` (a subtree of the saved pure state, abstract arrays)."""
    self.wait()
    return self.manager.restore(step, args=ocp.args.Composite(
        **{STATE: _restore_args(part, partial=True)}))[STATE]

  def close(self) -> None:
    self.wait()
    self.manager.close()


def restore_model(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[Any, dict[str, Any]]:
  """(model in eval mode, checkpoint meta with "step") of one training run folder.

  ``step`` None: the checkpoint the run's ``select`` names (its meta, ``train.select``): the
  latest for "last", the best-scored kept step for "best" (also for checkpoints that predate the
  field), the latest when none is scored. The model is rebuilt from the config
  saved in the checkpoint's meta (``models.make_model``) and only its arrays are read from the
  saved (model, optimizer) state; RNG streams are fresh (inference draws no randomness and
  their saved layout may differ). The model is built abstractly (``nnx.eval_shape``): a random
  init would compile a small XLA program per parameter only to be overwritten. Raises
  NoCheckpointError / CheckpointMismatchError.
  """
  run_dir = pathlib.Path(run_dir)
  ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    step = step if step is not None else ckpt.selected_step()
    if step is None:
      raise NoCheckpointError(f"{run_dir}/checkpoints: no checkpoint saved")
    meta = ckpt.read_meta(step)
    model_cfg = ml_collections.ConfigDict(meta["model"])
    model = nnx.eval_shape(lambda: models.make_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, rng_state, params = nnx.split(model, nnx.RngState, ...)
    # Host arrays, as the model's own layout is not known here.
    part = {MODEL_PART: nnx.to_pure_dict(_abstract(params, shardings=False))}
    lines = _differences(ckpt.saved_shapes(step), _stored_shapes(part), part=True)
    if lines:
      raise CheckpointMismatchError("\n".join(
          [f"{run_dir}: checkpoint step {step} does not fit model {meta.get('model')}:"] + lines))
    restored = ckpt.restore_part(step, part)[MODEL_PART]
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(params, restored)
  model = nnx.merge(graphdef, jax.tree.map(_fresh, rng_state), params)
  model.eval()
  return model, dict(meta, step=step)

