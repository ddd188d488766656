"""Several JAX processes on this machine, as a cluster runs them:

  python -m cspine_jax.launch_local --processes=2 [--devices_per_process=1] -- \
      launch.py --config=configs/stage2.py:cpu --workdir=runs/stage2_mp

Each process gets JAX_COORDINATOR_ADDRESS (a free local port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, and that many CPU devices; their output is prefixed [p<i>] (or written to
--output_dir/process_<i>.log). Ctrl-C / SIGTERM reach every process; when one fails, the others
are stopped after --grace_s seconds. Exits with the worst exit status. After --, a .py file or
-m module runs with this Python; bare flags are launch.py's.
"""
import sys

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax.train import processes

_PROCESSES = flags.DEFINE_integer("processes", 2, "JAX processes to start", lower_bound=1)
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "CPU devices of each process",
                                lower_bound=1)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "write each process's output to "
                               "OUTPUT_DIR/process_<i>.log instead of prefixed lines on stdout")
_GRACE = flags.DEFINE_float("grace_s", 30.0, "seconds the others get to stop by themselves "
                            "after one process failed")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", None, "seconds without a heartbeat "
                                  "after which JAX counts a process as dead (default: "
                                  "CSPINE_HEARTBEAT_TIMEOUT_S or 60)", lower_bound=1)
_PLATFORM = flags.DEFINE_string("platform", "cpu", "JAX_PLATFORMS of the processes ('' leaves "
                                "it as it is)")


def main(argv) -> int:
  cli_setup.quiet_library_logs()  # the command comes as positional arguments, after --
  try:
    command = processes.command_of(argv[1:])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  outcome = processes.run(command, _PROCESSES.value, devices=_DEVICES.value,
                          log_dir=_OUTPUT_DIR.value, grace_s=_GRACE.value,
                          heartbeat_s=_HEARTBEAT.value, platform=_PLATFORM.value or None)
  return outcome.status


if __name__ == "__main__":
  sys.exit(app.run(main))
