"""Test setup shared by every test module.

JAX must see 8 fake CPU devices before it starts (sharding tests), and absl flags must count as
parsed because grain worker processes and library code read them.
"""
import os
import pathlib
import sys
import types

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

# Real scanner files made by others, kept in the repository (tests/fixtures/real/README.md: source
# and licence).
REAL_DATA = REPO / "tests" / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_data_dir():
  if not REAL_DATA.exists():
    pytest.fail(f"real CT fixtures missing: {REAL_DATA}")
  return REAL_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The whole method at ``configs/demo.py:tiny``, once per test process (about 90 s on 2 cores):
  ``.workdir`` (data/, run/, test/, ...), ``.figures`` (runner.run's result), ``.log`` (its
  progress lines). Tests read it and must leave it as they found it."""
  from configs import demo  # lazy: only sessions that use the tiny run import the pipeline
  from cspine_jax.pipeline import runner  # lazy: as above
  workdir = tmp_path_factory.mktemp("tiny_run")
  lines: list[str] = []
  figures = runner.run(demo.get_config("tiny"), workdir, log=lines.append)
  return types.SimpleNamespace(workdir=workdir, figures=figures, log=lines)
