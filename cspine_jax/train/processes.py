"""Several JAX processes on one machine, started as a cluster starts them (``launch_local``).

:func:`run` starts ``count`` copies of a command, each with the environment ``train.runtime``
reads to join the others (``JAX_COORDINATOR_ADDRESS`` on a free local port,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) and ``devices`` CPU devices. Their output goes to this
process's stdout, each line prefixed ``[p<i>]`` (progress-bar redraws at most every
``PROGRESS_EVERY_S``), or to ``<log_dir>/process_<i>.log``. SIGINT/SIGTERM are passed on to every
process (a second one kills them). When one process fails, the others get ``grace_s`` seconds
to stop by themselves (the JAX distributed service ends them once the failed one has missed its
heartbeats) before they are terminated. The result is the worst exit status. Each process is told
this one's pid (``CSPINE_LAUNCHER_PID``) and, once ``train.runtime.start`` has run, ends with it:
a launcher killed and started again never races the old run's processes in the same workdir.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from cspine_jax.train import runtime

PREFIX = "[launch_local]"
PROGRESS_EVERY_S = 10.0
KILL_AFTER_TERM_S = 10.0
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
_LINE_END = re.compile(rb"(?<=[\r\n])")  # splits after each line or carriage-return end


def free_port() -> int:
  """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices: int, *,
                base: dict[str, str] | None = None, platform: str | None = "cpu",
                heartbeat_s: int | None = None) -> dict[str, str]:
  """The environment of process ``index`` of ``count``: ``base`` (default: this one's) plus the
  coordinator, the process set, ``devices`` host-platform devices, unbuffered Python output and
  this process as the launcher to end with."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
             JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
  flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  if platform:
    env["JAX_PLATFORMS"] = platform
  if heartbeat_s is not None:
    env[runtime.HEARTBEAT_ENV] = str(int(heartbeat_s))
  env[runtime.LAUNCHER_ENV] = str(os.getpid())
  return env


def command_of(args: Sequence[str]) -> list[str]:
  """What to run: ``prog.py ...`` and ``-m module ...`` with this Python, bare flags as
  ``launch.py``'s (in the current folder), anything else as it is."""
  args = list(args)
  if not args:
    raise ValueError("no command to run: give it after --, e.g. -- launch.py --config=...")
  if args[0] == "-m" or (args[0].endswith(".py") and not args[0].startswith("-")):
    return [sys.executable] + args
  if args[0].startswith("-"):
    return [sys.executable, "launch.py"] + args
  return args


def exit_status(code: int) -> int:
  """A Popen return code as a shell reports it (killed by signal s: 128 + s)."""
  return 128 - code if code < 0 else code


def describe(code: int) -> str:
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exited {code}"


@dataclasses.dataclass
class Outcome:
  """Each process's return code (Popen's: -s when killed by signal s) and the first to fail."""
  codes: list[int]
  first_failure: int | None

  @property
  def status(self) -> int:
    """The worst exit status (0 when every process succeeded)."""
    return max(exit_status(c) for c in self.codes)


class _Pump(threading.Thread):
  """Copies one process's output to ``out`` with a prefix, line by line; a segment ended by a
  carriage return (a progress bar redrawn) only when ``PROGRESS_EVERY_S`` has passed."""

  def __init__(self, stream: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock):
    super().__init__(daemon=True)
    self.stream, self.prefix, self.out, self.lock = stream, prefix, out, lock
    self._last_redraw = 0.0

  def _emit(self, text: str) -> None:
    with self.lock:
      self.out.write(f"{self.prefix} {text}\n")
      self.out.flush()

  def run(self) -> None:
    buf = b""
    while chunk := self.stream.read1(65536):
      *segments, buf = _LINE_END.split(buf + chunk)
      for segment in segments:
        text = segment.decode(errors="replace").rstrip()
        if not text:
          continue
        if segment.endswith(b"\r"):
          now = time.monotonic()
          if now - self._last_redraw < PROGRESS_EVERY_S:
            continue
          self._last_redraw = now
        self._emit(text)
    if buf.strip():
      self._emit(buf.decode(errors="replace").rstrip())


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  """``sig`` to the process and what it started (its own session: grain's workers too)."""
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def run(command: Sequence[str], count: int, *, devices: int = 1,
        log_dir: str | os.PathLike | None = None, grace_s: float = 30.0,
        heartbeat_s: int | None = None, platform: str | None = "cpu",
        out: IO[str] | None = None, cwd: str | os.PathLike | None = None,
        base_env: dict[str, str] | None = None) -> Outcome:
  """Runs ``command`` as JAX processes 0..count-1 of one run and waits for them (see the module
  docstring); returns their return codes."""
  if count < 1 or devices < 1:
    raise ValueError(f"need at least one process and one device each; got {count} x {devices}")
  out = out or sys.stdout
  lock = threading.Lock()

  def say(text: str) -> None:
    with lock:
      out.write(f"{PREFIX} {text}\n")
      out.flush()

  port = free_port()
  folder = pathlib.Path(log_dir) if log_dir is not None else None
  if folder is not None:
    folder.mkdir(parents=True, exist_ok=True)
  procs, pumps, files = [], [], []
  say(f"{count} processes x {devices} devices, coordinator 127.0.0.1:{port}: "
      f"{' '.join(command)}")
  try:
    for i in range(count):
      env = process_env(i, count, port, devices, base=base_env, platform=platform,
                        heartbeat_s=heartbeat_s)
      if folder is not None:
        f = open(folder / f"process_{i}.log", "wb")  # pylint: disable=consider-using-with
        files.append(f)
        stdout = f
      else:
        stdout = subprocess.PIPE
      # Its own session: a terminal's Ctrl-C reaches it once, through this process.
      proc = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=stdout,
                              stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(proc)
      if folder is not None:
        say(f"process {i}: pid {proc.pid}, output in {folder / f'process_{i}.log'}")
      else:
        pumps.append(_Pump(proc.stdout, f"[p{i}]", out, lock))
        pumps[-1].start()
    return _wait(procs, grace_s, say)
  finally:
    for proc in procs:  # leftovers of each process's session (its worker processes)
      if proc.poll() is None:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
      _signal_group(proc, signal.SIGKILL)
    for pump in pumps:
      pump.join(timeout=5)
    for f in files:
      f.close()


def _wait(procs: list[subprocess.Popen], grace_s: float, say) -> Outcome:
  state = {"signals": 0}

  def forward(signum, _frame):
    state["signals"] += 1
    sig = signum if state["signals"] == 1 else signal.SIGKILL
    say(f"{signal.Signals(signum).name}: passing {signal.Signals(sig).name} on to every process")
    for proc in procs:
      if proc.poll() is None:
        _signal_group(proc, sig)

  on_main = threading.current_thread() is threading.main_thread()
  previous = {}
  if on_main:
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, forward)
  first_failure, failed_at, termed_at = None, None, None
  try:
    while True:
      codes = [p.poll() for p in procs]
      for i, code in enumerate(codes):
        if code not in (None, 0) and first_failure is None:
          first_failure, failed_at = i, time.monotonic()
          if any(c is None for c in codes):
            say(f"process {i} {describe(code)}; the others get {grace_s:g} s to stop")
      if all(c is not None for c in codes):
        break
      now = time.monotonic()
      if failed_at is not None and termed_at is None and now - failed_at > grace_s:
        alive = [i for i, c in enumerate(codes) if c is None]
        say(f"processes {alive} still running {grace_s:g} s after process {first_failure} "
            "failed: terminating them")
        for i in alive:
          _signal_group(procs[i], signal.SIGTERM)
        termed_at = now
      elif termed_at is not None and now - termed_at > KILL_AFTER_TERM_S:
        for i, c in enumerate(codes):
          if c is None:
            _signal_group(procs[i], signal.SIGKILL)
      time.sleep(0.1)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  codes = [p.returncode for p in procs]
  outcome = Outcome(codes, first_failure)
  if outcome.status:
    say("; ".join(f"process {i} {describe(c)}" for i, c in enumerate(codes)) +
        f" (exit status {outcome.status})")
  return outcome
