"""Orbax checkpoints: round trip with RNG + iterator, 8 devices -> 1, wrong model, keep last/best,
the model part alone (restore_model)."""
import json
import os
import pathlib
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from cspine_jax import models
from cspine_jax.inputs import loader as loader_lib
from cspine_jax.train import checkpoints, sharding, steps, tasks
from test_input import write_task_shards
from test_train import TinySeq

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_trainer(width=8, num_devices=None):
  tx = steps.make_tx(steps.make_schedule(1e-2, 10, 1), weight_decay=1e-5, clip_norm=1.0)
  return steps.Trainer(TinySeq(width, rngs=nnx.Rngs(0, dropout=1)), tx, tasks.get("stage2"),
                       sharding.make_mesh(num_devices))


def make_iterator(records):
  src = loader_lib.record_index(records, "stage2").source()
  loader = loader_lib.make_loader(src, "stage2", batch_size=8, train=True, seed=0,
                              shard_options=grain.sharding.NoSharding())
  return iter(loader)


def _param_sum(state):
  return float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(state[0])
                   if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)))


def test_round_trip_resumes_state_rng_and_data(tmp_path):
  records = write_task_shards(tmp_path / "rec", "stage2", 21)
  trainer, it = make_trainer(), make_iterator(records)
  mesh = trainer.mesh
  for _ in range(2):
    trainer.state, _ = trainer.train_step(trainer.state, sharding.shard_batch(next(it), mesh))
  ck = checkpoints.Checkpointer(tmp_path / "ck", keep=2)
  ck.save(2, trainer.state, it, {"task": "stage2"})
  nxt = next(it)
  trainer.state, m_want = trainer.train_step(trainer.state, sharding.shard_batch(nxt, mesh))
  ck.close()

  fresh, it2 = make_trainer(), make_iterator(records)
  ck2 = checkpoints.Checkpointer(tmp_path / "ck", keep=2)
  assert ck2.latest_step() == 2
  fresh.state, meta = ck2.restore(2, fresh.state, it2)
  assert meta["step"] == 2 and meta["task"] == "stage2" and fresh.step == 2
  got = next(it2)
  np.testing.assert_array_equal(got["record_id"], nxt["record_id"])
  fresh.state, m_got = fresh.train_step(fresh.state, sharding.shard_batch(got, mesh))
  assert float(m_got["loss"]) == float(m_want["loss"])  # same params, dropout key and batch
  assert _param_sum(fresh.state) == _param_sum(trainer.state)
  ck2.close()


def test_keeps_last_k_and_the_best(tmp_path):
  records = write_task_shards(tmp_path / "rec", "stage2", 14)
  trainer, it = make_trainer(), make_iterator(records)
  ck = checkpoints.Checkpointer(tmp_path / "ck", keep=2, keep_best=1, async_save=False)
  scores = {1: 0.9, 2: 0.3, 3: None, 4: 0.8, 5: None, 6: 0.7}
  for s, score in scores.items():
    ck.save(s, trainer.state, it, {}, score=score)
  ck.wait()
  kept = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
  assert kept == [2, 5, 6]  # best score (2) + the last two
  assert ck.best_step() == 2 and ck.latest_step() == 6
  ck.close()
  # After a restart the scores are read back: more saves still keep the best.
  ck = checkpoints.Checkpointer(tmp_path / "ck", keep=2, keep_best=1, async_save=False)
  for s in (7, 8):
    ck.save(s, trainer.state, it, {})
  ck.wait()
  kept = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
  assert kept == [2, 7, 8] and ck.best_step() == 2
  ck.close()


def test_other_model_fails_with_a_clear_message(tmp_path):
  records = write_task_shards(tmp_path / "rec", "stage2", 14)
  trainer, it = make_trainer(width=8), make_iterator(records)
  ck = checkpoints.Checkpointer(tmp_path / "ck")
  ck.save(1, trainer.state, it, {"task": "stage2", "model": {"width": 8}})
  ck.close()
  other = make_trainer(width=12)
  ck2 = checkpoints.Checkpointer(tmp_path / "ck")
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"(?s)another model.*shape differs.*conv.kernel.*\(3, 3, 3, 8\).*\(3, 3, 3, 12\)"):
    ck2.restore(1, other.state, make_iterator(records))
  ck2.close()


def test_restore_model_reads_the_model_part(tmp_path, monkeypatch):
  records = write_task_shards(tmp_path / "rec", "stage2", 14)
  trainer, it = make_trainer(), make_iterator(records)
  trainer.state, _ = trainer.train_step(trainer.state, sharding.shard_batch(next(it), trainer.mesh))
  run = tmp_path / "run"
  ck = checkpoints.Checkpointer(run / "checkpoints", async_save=False)
  ck.save(1, trainer.state, it, {"task": "stage2", "model": {"width": 8}})
  ck.close()
  monkeypatch.setattr(models, "make_model", lambda cfg, rngs: TinySeq(cfg.width, rngs=rngs),
                      raising=False)
  model, meta = checkpoints.restore_model(run)
  assert meta["step"] == 1
  want = nnx.to_pure_dict(nnx.state(trainer.model(), nnx.Not(nnx.RngState)))
  got = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # A model of another width: the arrays that differ are named.
  ck = checkpoints.Checkpointer(run / "checkpoints", async_save=False)
  ck.save(2, trainer.state, it, {"task": "stage2", "model": {"width": 12}})
  ck.close()
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"(?s)step 2 does not fit.*0\.conv\.kernel saved \(3, 3, 3, 8\)"):
    checkpoints.restore_model(run, step=2)


_RESTORE_ON_ONE = """
import os, sys, json
sys.path[:0] = [{repo!r}, {tests!r}]
import jax
from test_checkpoints import make_trainer, make_iterator, _param_sum
from cspine_jax.train import checkpoints
assert jax.device_count() == 1, jax.devices()
t = make_trainer()
ck = checkpoints.Checkpointer({ck!r})
t.state, meta = ck.restore(ck.latest_step(), t.state, make_iterator({rec!r}))
ck.close()
leaf = jax.tree.leaves(t.state)[0]
print(json.dumps({{"sum": _param_sum(t.state), "step": meta["step"], "devices": len(leaf.sharding.device_set)}}))
"""


def test_saved_on_8_devices_restores_on_1(tmp_path):
  assert jax.device_count() == 8
  records = write_task_shards(tmp_path / "rec", "stage2", 14)
  trainer, it = make_trainer(), make_iterator(records)
  trainer.state, _ = trainer.train_step(trainer.state, sharding.shard_batch(next(it), trainer.mesh))
  ck = checkpoints.Checkpointer(tmp_path / "ck")
  ck.save(1, trainer.state, it, {})
  ck.close()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  code = _RESTORE_ON_ONE.format(repo=str(REPO), tests=str(REPO / "tests"), ck=str(tmp_path / "ck"),
                                rec=str(records))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=180)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["devices"] == 1 and got["step"] == 1
  assert got["sum"] == pytest.approx(_param_sum(trainer.state), rel=1e-6)
