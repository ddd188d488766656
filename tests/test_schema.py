import numpy as np
import pytest

from cspine_jax.records import schema


def test_round_trip_arrays_and_meta():
  rec = {"images": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
         "label": np.float32(1.0), "box": np.array([0.1, 0.2, 0.3, 0.4], np.float32),
         "study_uid": "1.2.3", "fold": 3, "present": True}
  out = schema.decode(schema.encode(rec))
  np.testing.assert_array_equal(out["images"], rec["images"])
  np.testing.assert_array_equal(out["box"], rec["box"])
  assert out["label"] == 1.0 and out["study_uid"] == "1.2.3" and out["fold"] == 3 and out["present"]


def test_truncated_and_foreign_records_fail_clearly():
  data = schema.encode({"x": np.zeros((10, 10), np.float32)})
  with pytest.raises(schema.RecordError, match="truncated"):
    schema.decode(data[:-5])
  with pytest.raises(schema.RecordError, match="magic"):
    schema.decode(b"\x80\x04" + data[2:])
  bumped = data[:4] + (schema.SCHEMA_VERSION + 1).to_bytes(2, "little") + data[6:]
  with pytest.raises(schema.RecordError, match="version"):
    schema.decode(bumped)


def test_object_arrays_are_refused():
  with pytest.raises(TypeError):
    schema.encode({"x": np.array([object()])})
