"""What a JAX process sets up once, where a run starts (training, inference, a benchmark).

:func:`start` joins the other JAX processes when the environment says several take part, keeps
freed host memory in the process on CPU (glibc), builds or loads the native CPU kernels and points
XLA's persistent compilation cache at a folder. Nothing else in the package changes process-wide
state; library code only reads what was set up here.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pathlib

import jax

from cspine_jax.models.cpu import native

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def wants_distributed(env: dict[str, str] | None = None) -> bool:
  """True when the environment describes several hosts (explicit coordinator, SLURM, TPU pod)."""
  env = os.environ if env is None else env
  if any(env.get(k) for k in _MULTIHOST_ENV):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def distributed_args(env: dict[str, str] | None = None) -> dict[str, int]:
  """num_processes / process_id from JAX_NUM_PROCESSES / JAX_PROCESS_ID (a plain multi-node launch
  without SLURM, MPI or a TPU pod, whose values JAX detects itself)."""
  env = os.environ if env is None else env
  out = {}
  for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if env.get(key):
      try:
        out[arg] = int(env[key])
      except ValueError as e:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from e
  return out


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` once when several hosts take part (before any jax op)."""
  if wants_distributed():
    try:
      jax.distributed.initialize(**distributed_args())
    except RuntimeError as e:
      if "already" not in str(e):
        raise


@functools.cache
def keep_freed_host_memory() -> bool:
  """glibc: large blocks from the heap, and freed memory kept for the next step (process-wide,
  once; False where the C library is not glibc).

  XLA:CPU allocates each step's scratch buffer afresh; glibc maps blocks above 32 MB and unmaps
  them when freed, so every step page-faulted its buffer in again. The cost: the process keeps
  its peak host memory until it exits.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
  except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator as it is
    return False


def compilation_cache(folder: str | os.PathLike) -> None:
  """A persistent XLA cache in ``folder``: later folds and reruns reuse the compiled steps,
  which on a few CPU cores cost more than short trainings themselves."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def start(*, cache_dir: str | os.PathLike | None = None) -> None:
  """The process-wide set-up of a run (each part once; calling it again changes nothing)."""
  maybe_initialize_distributed()
  if jax.default_backend() == "cpu":
    keep_freed_host_memory()
    native.load_once()  # before any model is built: `models.cpu.choose_method` asks for them
  if cache_dir is not None:
    compilation_cache(cache_dir)
