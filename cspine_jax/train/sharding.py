"""Device mesh and sharding rules: batch split over a 'data' axis, parameters by a named rule.

``param_rule="replicated"`` copies every parameter/optimizer array to all devices (data parallel);
``param_rule="fsdp"`` splits each large array along its largest axis divisible by the mesh size
(ZeRO-3 style). Switching between them is a config change (``train.param_sharding``); the step
functions get their shardings from here and never hard-code a layout.

With several JAX processes the mesh lists the devices process by process, so the global batch is
the processes' batches one after the other (:func:`shard_batch`), and :func:`put` lays out values
every process holds alike (the initial state) without a transfer between them.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
RULES = ("replicated", "fsdp")


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named 'data' over all (or the first ``num_devices``) devices."""
  n = num_devices or jax.device_count()
  # Process by process: process p's batch is then rows p*b..(p+1)*b of the global batch.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))[:n]
  # Auto axes: the compiler propagates shardings from the inputs/out_shardings (jax 0.10's
  # default is Explicit, which would make every model op name its output sharding).
  return jax.make_mesh((n,), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def array_spec(shape: tuple[int, ...], mesh: Mesh, rule: str, min_size: int = 2 ** 14) -> P:
  """The PartitionSpec of one parameter/optimizer array under ``rule``."""
  if rule not in RULES:
    raise ValueError(f"unknown parameter sharding rule {rule!r}; expected one of {RULES}")
  n = mesh.shape[DATA_AXIS]
  if rule == "replicated" or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest axis divisible by the number of devices; small or indivisible arrays stay replicated.
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, rule: str = "replicated") -> Any:
  """A tree of NamedSharding matching ``abstract_state`` (arrays or ShapeDtypeStructs)."""
  def one(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, array_spec(tuple(shape), mesh, rule))
  return jax.tree.map(one, abstract_state)


def _put_one(x: Any, sharding: NamedSharding) -> jax.Array:
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: place their key data
    data = _put_one(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  # Each process fills its own devices' shards from its copy: nothing crosses processes.
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree: Any, shardings: Any) -> Any:
  """``tree`` (values every process holds alike, e.g. a model built from the same seed) laid out
  by ``shardings``; ``jax.device_put`` where one process has every device, else each process
  fills its own shards (``device_put`` takes only shardings of this process's devices)."""
  return jax.tree.map(_put_one, tree, shardings)


def fingerprint(tree: Any) -> np.ndarray:
  """Per array: its sum and sum of squares (summed in float64 on the host; float32, which is what
  jax gathers without x64): equal trees, equal prints."""
  out = []
  for x in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    v = np.asarray(x).astype(np.float64)
    out += [v.sum(), np.square(v).sum()]
  return np.asarray(out, np.float32)


def check_same_on_every_process(tree: Any, what: str) -> None:
  """ValueError unless every JAX process holds the same ``tree`` (compared by
  :func:`fingerprint`); nothing to do with one process."""
  if jax.process_count() == 1:
    return
  prints = np.asarray(multihost_utils.process_allgather(fingerprint(tree)))
  differ = [i for i in range(len(prints)) if not np.array_equal(prints[i], prints[0])]
  if differ:
    raise ValueError(f"{what} differ between JAX processes (processes {differ} from process 0): "
                     "every process must build it from the same config, seed and weights")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's batch -> global arrays split over 'data' (each host passes its own part)."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "OUS":
      continue  # strings stay on the host
    if v.dtype == np.int64:  # jax runs without x64; say so explicitly instead of warning
      v = v.astype(np.int32)
    elif v.dtype == np.float64:
      v = v.astype(np.float32)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
  """The per-process batch size; the global batch must split evenly over the devices."""
  local_devices = mesh.local_mesh.size if hasattr(mesh, "local_mesh") else jax.local_device_count()
  if batch_size % local_devices:
    raise ValueError(f"per-process batch size {batch_size} does not split over {local_devices} "
                     "local devices; choose a multiple")
  return batch_size
