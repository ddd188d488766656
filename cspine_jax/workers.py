"""Worker processes that end with their parent.

A pool's worker must not outlive the process that started it: a killed run restarted with the
same command would otherwise race its old workers writing the same files, and the orphans would
hold memory and cores indefinitely. Pass :func:`end_with_parent` as the pool's initializer.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies (Linux)
PARENT_POLL_S = 1.0  # how often a worker checks that its parent lives (where prctl is missing)


def end_with_parent(parent_pid: int | None) -> None:
  """Worker initializer: the worker is killed when its parent dies (Linux: PR_SET_PDEATHSIG;
  elsewhere, and as a second guard, a thread that ends it once its parent process is gone).
  ``parent_pid``: the pool's process where the worker's parent is that process (fork, spawn)."""
  if sys.platform.startswith("linux"):
    try:
      ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
      pass
  parent = os.getppid()
  if parent_pid is not None and parent != parent_pid:  # it died before prctl took effect
    os._exit(1)

  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_S)
    os._exit(1)

  threading.Thread(target=watch, name="parent-watch", daemon=True).start()
