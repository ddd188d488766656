"""Reading studies ahead of the models: decoder processes give what read_series gives, in order."""
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from cspine_jax.infer import reader
from cspine_jax.io import dicom
import procs


def _shm_blocks() -> set[str]:
  shm = pathlib.Path("/dev/shm")
  return {p.name for p in shm.iterdir() if p.name.startswith("psm_")} if shm.exists() else set()


def _folders(tmp_path, real_data_dir) -> list[pathlib.Path]:
  """Real scanner series (JPEG Lossless, JPEG 2000) and an unreadable folder in between."""
  root = real_data_dir / "totalseg_ct"
  out = []
  for i, name in enumerate(["dicom_jpeg_lossless", "BAD", "dicom_j2k", "dicom_jpeg_lossless"]):
    dst = tmp_path / f"study{i}"
    if name == "BAD":
      dst.mkdir()
      (dst / "1.dcm").write_bytes(b"not a dicom file")
    else:
      shutil.copytree(root / name, dst)
    out.append(dst)
  return out


def test_decoder_processes_match_read_series_in_order(tmp_path, real_data_dir):
  folders = _folders(tmp_path, real_data_dir)
  before = _shm_blocks()
  got = list(reader.read_studies(folders, workers=2, depth=1))
  assert [g[0] for g in got] == folders
  for folder, series, error, seconds in got:
    if folder.name == "study1":
      assert series is None and isinstance(error, dicom.SeriesError) and "study1" in str(error)
      continue
    assert error is None and seconds > 0
    want = dicom.read_series(folder, warn=False)
    np.testing.assert_array_equal(series.volume, want.volume)
    assert series.volume.dtype == want.volume.dtype
    np.testing.assert_array_equal(series.positions, want.positions)
    assert series.file_names == want.file_names and series.study_uid == want.study_uid
  assert _shm_blocks() <= before  # every block handed back was freed


def test_thread_path_and_early_stop_free_everything(tmp_path, real_data_dir):
  folders = _folders(tmp_path, real_data_dir)
  threaded = [(f, s is not None, e is not None) for f, s, e, _ in reader.read_studies(folders)]
  assert threaded == [(f, f.name != "study1", f.name == "study1") for f in folders]
  before = _shm_blocks()
  stream = reader.read_studies(folders, workers=2, depth=2)
  first = next(stream)
  assert first[0] == folders[0] and first[1].volume.ndim == 3
  stream.close()  # the studies decoded ahead but never consumed must not leak shared memory
  assert _shm_blocks() <= before


def test_default_decode_workers_leave_small_machines_one_thread(monkeypatch):
  from cspine_jax.infer import predict  # lazy: decoder workers import this module; no JAX there
  for cores, want in ((1, 0), (2, 0), (3, 0), (4, 2), (16, 8)):
    monkeypatch.setattr(predict.os, "cpu_count", lambda c=cores: c)
    assert predict.default_decode_workers() == want


def _halves(series: dicom.Series) -> dict[str, np.ndarray]:
  """A ``prepare`` for the tests: host work on the decoded series, returned beside it."""
  return {"top": series.volume[: len(series.volume) // 2] * 2,
          "count": np.array([len(series.volume)])}


def test_prepare_runs_in_the_decoders_and_arrays_come_back_mapped(tmp_path, real_data_dir):
  folders = _folders(tmp_path, real_data_dir)
  before = _shm_blocks()
  threaded = list(reader.read_studies(folders, prepare=_halves))
  pooled = list(reader.read_studies(folders, workers=2, depth=1, prepare=_halves))
  for (f1, a, e1, _), (f2, b, e2, _) in zip(threaded, pooled):
    assert f1 == f2 and (e1 is None) == (e2 is None)
    if e1 is not None:
      assert a is None and b is None and "study1" in str(e2)
      continue
    (s1, x1), (s2, x2) = a, b
    np.testing.assert_array_equal(s1.volume, s2.volume)
    assert x1.keys() == x2.keys() == {"top", "count"}
    for k in x1:
      np.testing.assert_array_equal(x1[k], x2[k])
      assert x1[k].dtype == x2[k].dtype
    np.testing.assert_array_equal(x2["top"], s2.volume[: len(s2.volume) // 2] * 2)
    s2.volume[0, 0, 0] = 12345  # a private (copy-on-write) mapping: writable, affects no one
    assert s2.volume[0, 0, 0] == 12345
  assert _shm_blocks() <= before  # the mapped blocks' names were freed as they were taken


_READ_FOREVER = """
import itertools, pathlib, sys, time
from cspine_jax.infer import reader
folders = [pathlib.Path(p) for p in sys.argv[1:]]
for item in reader.read_studies(list(itertools.islice(itertools.cycle(folders), 400)), workers=2,
                                depth=1):
  print("read", flush=True)
  time.sleep(0.2)  # a slow consumer: the decoders wait with studies in flight
"""


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc")
def test_decoder_processes_end_with_a_killed_parent(tmp_path, real_data_dir):
  folders = [f for f in _folders(tmp_path, real_data_dir) if f.name != "study1"]
  proc = subprocess.Popen([sys.executable, "-c", _READ_FOREVER, *map(str, folders)],
                          cwd=pathlib.Path(__file__).resolve().parents[1],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "read"
  workers = procs.children(proc.pid)
  assert len(workers) >= 2, workers
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not procs.still_alive(workers), "decoder processes outlived their parent"
