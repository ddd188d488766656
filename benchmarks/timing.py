"""Timing helpers shared by the benchmark scripts (no flags here: scripts define their own)."""
import time

import jax


def first_call(fn) -> float:
  """Seconds of fn's first call (compile + one run)."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def timed(fn, n: int, warm_up: bool = True) -> float:
  """Seconds per call of fn over n calls (after one warm-up call unless ``warm_up`` is False)."""
  if warm_up:
    jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n
