"""Outputs a later step reads are written whole or not at all (cspine_jax.io.files)."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pandas as pd
import pytest

from cspine_jax.io import files

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "prior.json"
  files.write_json(path, {"C1": 0.1})
  with pytest.raises(RuntimeError):
    with files.replacing(path) as f:
      f.write('{"C1": 0.')
      raise RuntimeError("killed while writing")
  assert json.loads(path.read_text()) == {"C1": 0.1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.json"]


def test_text_json_and_csv_round_trip(tmp_path):
  files.write_text(tmp_path / "a.txt", "x\ny\n")
  files.write_json(tmp_path / "b.json", {"k": [1, 2]})
  frame = pd.DataFrame({"StudyInstanceUID": ["1.2"], "C1": [0.25]})
  files.write_csv(frame, tmp_path / "c.csv", index=False)
  assert (tmp_path / "a.txt").read_text() == "x\ny\n"
  assert json.loads((tmp_path / "b.json").read_text()) == {"k": [1, 2]}
  pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c.csv", dtype={"StudyInstanceUID": str}),
                                frame)


def test_a_writer_killed_mid_file_leaves_the_old_file_whole(tmp_path):
  """SIGKILL between the first and the last byte: the reader finds the previous submission."""
  path = tmp_path / "submission.csv"
  files.write_text(path, "row_id,fractured\n1.2_C1,0.1\n")
  code = (f"import os, signal\nfrom cspine_jax.io import files\n"
          f"with files.replacing({str(path)!r}) as f:\n"
          f"  f.write('row_id,fractured\\n1.2_C1,0.')\n  f.flush()\n"
          f"  os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", code], check=False, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == -signal.SIGKILL
  assert path.read_text() == "row_id,fractured\n1.2_C1,0.1\n"
  # Only the dead writer's temporary is left beside it, under a name no reader opens.
  assert [p.name for p in tmp_path.iterdir() if p != path][0].startswith("submission.csv.tmp-")
