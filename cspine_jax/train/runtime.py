"""What a JAX process sets up once, where a run starts (training, inference, a benchmark).

:func:`start` joins the other JAX processes when the environment says several take part, keeps
freed host memory in the process on CPU (glibc), builds or loads the native CPU kernels and points
XLA's persistent compilation cache at a folder. Nothing else in the package changes process-wide
state; library code only reads what was set up here.

Several processes: on CPU they reduce over gloo (TCP). A process that stops sending heartbeats for
``CSPINE_HEARTBEAT_TIMEOUT_S`` seconds (default 60) is declared dead by the JAX distributed
service, which then ends every other process with a message naming it; a collective that loses
its peer fails at once (:func:`is_peer_failure`). :func:`share` / :func:`wait_for_shared` pass a
short text from one process to the others through the service's key-value store (a wait of
hours, unlike a collective).
"""
from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import re

import jax
from jax._src import distributed as jax_distributed  # the service's client: no public handle

from cspine_jax import workers
from cspine_jax.models.cpu import native

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
HEARTBEAT_ENV = "CSPINE_HEARTBEAT_TIMEOUT_S"
LAUNCHER_ENV = "CSPINE_LAUNCHER_PID"  # set by train.processes: the launcher to end with
DEFAULT_HEARTBEAT_S = 60
# What a collective or the distributed service says when another process has gone.
_PEER_FAILURE_MARKS = ("gloo", "connection closed", "connection reset", "heartbeat",
                       "coordination service", "distributed service", "barrier")
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


def heartbeat_timeout(env: dict[str, str] | None = None) -> int:
  """Seconds without a heartbeat after which a process counts as dead
  (``CSPINE_HEARTBEAT_TIMEOUT_S``, default 60): how long the others wait for a killed one before
  they stop."""
  env = os.environ if env is None else env
  value = env.get(HEARTBEAT_ENV) or str(DEFAULT_HEARTBEAT_S)
  try:
    seconds = int(value)
  except ValueError as e:
    raise ValueError(f"environment variable {HEARTBEAT_ENV}={value!r} is not an integer") from e
  if seconds < 1:
    raise ValueError(f"environment variable {HEARTBEAT_ENV}={value!r} must be at least 1")
  return seconds


def end_with_launcher(env: dict[str, str] | None = None) -> None:
  """A process started by ``launch_local`` (``CSPINE_LAUNCHER_PID``) ends when the launcher dies;
  at once when it is gone already. Nothing when another process stands between them (a shell)."""
  value = (os.environ if env is None else env).get(LAUNCHER_ENV)
  if not value:
    return
  try:
    pid = int(value)
  except ValueError as e:
    raise ValueError(f"environment variable {LAUNCHER_ENV}={value!r} is not a pid") from e
  if os.getppid() == pid:
    workers.end_with_parent(pid)
    return
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    os._exit(1)  # the launcher died before this process got here
  except PermissionError:
    pass


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` once when several hosts take part (before any jax op)."""
  if wants_distributed():
    # Cross-process reductions on CPU (jax 0.10's default; said here so that no default decides).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(**distributed_args(),
                                 heartbeat_timeout_seconds=heartbeat_timeout())
    except RuntimeError as e:
      if "already" not in str(e):
        raise


def is_peer_failure(error: BaseException) -> bool:
  """Whether ``error`` (raised by a step, a barrier) says another JAX process has gone."""
  text = str(error).lower()
  return jax.process_count() > 1 and any(mark in text for mark in _PEER_FAILURE_MARKS)


def lost_processes(error: BaseException) -> list[int]:
  """The processes that ``error``'s text names as gone: declared dead by the distributed service
  or missing at a barrier (empty when it names none: a collective that lost its peer says only
  the peer's address)."""
  text = str(error)
  found = {int(i) for i in re.findall(r"[Tt]ask (\d+) heartbeat timeout", text)}
  for pattern in (r"stopped sending heartbeats\):\s*([\d,\s]+)",
                  r"[Ss]ome timed out task names:\s*([\d,\s]+)"):
    listed = re.search(pattern, text)
    if listed:
      found |= {int(i) for i in re.findall(r"\d+", listed.group(1))}
  return sorted(found)


def missing_processes(timeout_s: float,
                      name: str = "cspine_jax/after_a_failed_collective") -> list[int]:
  """After a collective failed: the processes that do not reach the barrier ``name`` within
  ``timeout_s`` (every process that saw the failure calls this), or those the distributed service
  declares dead meanwhile; empty when all came. Wait less than the heartbeat timeout: once it has
  passed, the service ends this process (naming the dead one in its own log line)."""
  try:
    _client().wait_at_barrier(name, int(timeout_s * 1000), None)
  except Exception as e:  # pylint: disable=broad-except  # the barrier's error names who is missing
    return lost_processes(e)
  return []


def _client():
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("the JAX distributed service is not running (one process)")
  return client


def share(key: str, value: str) -> None:
  """Publishes ``value`` under ``key`` to every JAX process (set once per key and run)."""
  _client().key_value_set(key, value)


def wait_for_shared(key: str, timeout_s: float) -> str:
  """The value another process :func:`share`-d under ``key``, waiting up to ``timeout_s``; a dead
  publisher ends this process after the heartbeat timeout instead."""
  return _client().blocking_key_value_get(key, int(timeout_s * 1000))


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
  end_with_launcher()
  maybe_initialize_distributed()
  if jax.default_backend() == "cpu":
    keep_freed_host_memory()
    native.load_once()  # before any model is built: `models.cpu.choose_method` asks for them
  if cache_dir is not None:
    compilation_cache(cache_dir)
