"""Training machinery: sharded steps, losses, NaN stop, kill-and-resume, validation outputs."""
import json
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import stage2 as stage2_config
from cspine_jax import metrics
from cspine_jax.inputs import augment as augment_lib
from cspine_jax.pipeline import training
from cspine_jax.train import checkpoints, loop, losses, runtime, sharding, steps, tasks
from test_input import write_task_shards


class TinySeq(nnx.Module):
  """A stage-2-shaped model (B, T, H, W, 3) -> (B,) logits, small enough for CPU tests."""

  def __init__(self, width: int = 8, *, rngs: nnx.Rngs, nan_after: int = 0, dtype=jnp.float32):
    self.conv = nnx.Conv(3, width, (3, 3), strides=(2, 2), dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(width, 1, dtype=dtype, rngs=rngs)
    # A test hook: the forward pass turns NaN once it has run ``nan_after`` training steps.
    self.nan_after = nan_after
    self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, images, vertebra=None):
    b, t = images.shape[:2]
    x = images.reshape((b * t,) + images.shape[2:])
    f = jax.nn.relu(self.conv(x)).mean((1, 2)).reshape(b, t, -1).mean(1)
    out = self.head(self.drop(f))[:, 0]
    if self.nan_after:
      self.calls.value = self.calls.value + 1
      out = jnp.where(self.calls.value > self.nan_after, jnp.nan, out)
    return out


def tiny_config(**train):
  c = stage2_config.get_config("cpu")
  c.train.update(dict(log_every=1, progress=False, tensorboard=True, async_checkpoints=True, **train))
  c.input.batch_size = 8
  c.input.workers = 0
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 1
  c.num_folds = 3
  return c


def _batch(n=16, size=8, seed=0):
  rng = np.random.default_rng(seed)
  label = (np.arange(n) % 3 == 0).astype(np.float32)
  images = rng.normal(size=(n, 8, size, size, 3)) + 1.5 * label[:, None, None, None, None]
  return {"images": images.astype(np.float32), "label": label,
          "vertebra": (np.arange(n) % 7).astype(np.int32),
          "record_id": np.arange(n, dtype=np.int32)}


def test_sharded_steps_lower_the_loss():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  tx = steps.make_tx(steps.make_schedule(3e-2, 12, 1), weight_decay=1e-5, clip_norm=1.0)
  trainer = steps.Trainer(TinySeq(rngs=nnx.Rngs(0)), tx, tasks.get("stage2"), mesh)
  batch = sharding.shard_batch(_batch(), mesh)
  assert batch["images"].sharding.spec == P("data")
  assert len(batch["images"].sharding.device_set) == 8
  kernel = trainer.state[0]["conv"]["kernel"].value
  assert kernel.sharding.spec == P() and len(kernel.sharding.device_set) == 8
  first = None
  for _ in range(12):
    trainer.state, m = trainer.train_step(trainer.state, batch)
    first = first if first is not None else float(m["loss"])
  assert float(m["loss"]) < 0.7 * first
  kernel = trainer.state[0]["conv"]["kernel"].value
  assert kernel.sharding.spec == P()  # out_shardings keep the layout after donation
  assert trainer.step == 12
  out, em = trainer.eval_step(trainer.state, batch)
  assert out["prob"].shape == (16,) and out["prob"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(out["record_id"]), np.arange(16))


def test_fsdp_rule_shards_large_arrays():
  mesh = sharding.make_mesh()
  assert sharding.array_spec((64, 512), mesh, "fsdp") == P(None, "data")
  assert sharding.array_spec((3,), mesh, "fsdp") == P()
  assert sharding.array_spec((64, 512), mesh, "replicated") == P()
  tx = steps.make_tx(optax.constant_schedule(1e-3), weight_decay=0.0, clip_norm=None)
  model = TinySeq(width=2048, rngs=nnx.Rngs(0))  # conv kernel (3, 3, 3, 2048): split on the last axis
  trainer = steps.Trainer(model, tx, tasks.get("stage2"), mesh, param_rule="fsdp")
  fsdp = P(None, None, None, "data")
  assert trainer.state[0]["conv"]["kernel"].value.sharding.spec == fsdp
  moments = [x for x in jax.tree.leaves(trainer.state[1]) if x.shape == (3, 3, 3, 2048)]
  assert len(moments) == 2 and all(x.sharding.spec == fsdp for x in moments)  # Adam mu, nu
  assert trainer.state[0]["head"]["kernel"].value.sharding.spec == P()  # small: replicated
  trainer.state, m = trainer.train_step(trainer.state, sharding.shard_batch(_batch(), mesh))
  assert math.isfinite(float(m["loss"]))
  assert trainer.state[0]["conv"]["kernel"].value.sharding.spec == fsdp
  with pytest.raises(ValueError, match="unknown parameter sharding rule"):
    sharding.array_spec((8,), mesh, "zero9")


def test_losses_use_the_metric_weights():
  logits = jnp.array([0.0, 0.0])
  # 1 negative (weight 1) + 1 positive (weight 2): same BCE each, so the weighted mean is log 2.
  np.testing.assert_allclose(losses.vertebra_bce(logits, jnp.array([0.0, 1.0])), math.log(2), rtol=1e-6)
  z = jnp.array([[2.0, -1.0, 0.5, 0.0, 1.0, -2.0, 3.0, 0.1]])
  y = jnp.array([[1.0, 0, 1, 0, 0, 0, 1, 0]])
  want = metrics.weighted_log_loss(np.asarray(y), np.asarray(jax.nn.sigmoid(z)))
  np.testing.assert_allclose(losses.target_bce(z, y), want.mean(), rtol=1e-5)
  # 7 fracture logits: patient_overall = 1 - prod(1 - p), checked against the metric.
  z7 = z[:, 1:]
  p7 = jax.nn.sigmoid(z7)
  p8 = np.concatenate([1 - np.prod(1 - np.asarray(p7), -1, keepdims=True), np.asarray(p7)], -1)
  np.testing.assert_allclose(tasks.fracture_losses(z7, y), metrics.weighted_log_loss(np.asarray(y), p8),
                             rtol=1e-4)
  assert not bool(losses.is_finite(jnp.float32(jnp.nan)))


def test_presence_bce_weights_positive_targets():
  z = jnp.array([[1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 2.0], [0.0] * 7])
  y = jnp.array([[1.0, 0, 0, 1, 0, 0, 1], [0.0] * 7])
  p = 1 / (1 + np.exp(-np.asarray(z)))
  per = -(np.asarray(y) * np.log(p) + (1 - np.asarray(y)) * np.log(1 - p))
  np.testing.assert_allclose(losses.presence_bce(z, y), per.mean(), rtol=1e-6)
  # pos_weight 4: each positive term counts 4 times; the mean is still over the 7 targets.
  w = 1 + 3 * np.asarray(y)
  np.testing.assert_allclose(losses.presence_bce(z, y, pos_weight=4.0), (w * per).mean(1).mean(),
                             rtol=1e-6)
  # The padding row (mask 0) is left out; the stage-1 task passes its configured weight through.
  mask = jnp.array([1.0, 0.0])
  np.testing.assert_allclose(losses.presence_bce(z, y, mask, 4.0), (w * per)[0].mean(), rtol=1e-6)
  out = {"presence": z, "box": jnp.full((2, 4), 0.5), "area": jnp.zeros((2, 7))}
  batch = {"presence": y, "box": jnp.full((2, 4), 0.5), "area": jnp.zeros((2, 7))}
  _, m = tasks.get("stage1", presence_pos_weight=4.0).loss(out, batch, mask)
  np.testing.assert_allclose(m["presence_bce"], (w * per)[0].mean(), rtol=1e-6)


def test_schedule_warmup_and_cosine():
  s = steps.make_schedule(1e-3, 100, 10)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1e-3) < 1e-9 and float(s(100)) < 1e-8
  assert float(s(5)) == pytest.approx(5e-4)


def test_schedule_cosine_with_warm_restarts_as_torch_steps_it_per_epoch():
  # torch's CosineAnnealingWarmRestarts(T_0=5, eta_min=1e-6) stepped once an epoch (the seed):
  # epoch e runs at eta_min + (lr - eta_min) (1 + cos(pi (e mod 5) / 5)) / 2, restarting at 5, 10.
  lr, eta_min, per_epoch = 1e-4, 1e-6, 7
  s = steps.make_schedule(lr, 15 * per_epoch, 0, kind="cosine_restarts", steps_per_epoch=per_epoch,
                          restart_epochs=5, min_lr=eta_min)
  curve = np.array([float(s(t)) for t in range(15 * per_epoch)]).reshape(15, per_epoch)
  assert (curve == curve[:, :1]).all()  # one rate per epoch
  want = eta_min + (lr - eta_min) * (1 + np.cos(np.pi * (np.arange(15) % 5) / 5)) / 2
  np.testing.assert_allclose(curve[:, 0], want, rtol=1e-6)
  assert curve[0, 0] == pytest.approx(lr) and curve[5, 0] == pytest.approx(lr)  # restarts
  assert curve[4, 0] == pytest.approx(eta_min + (lr - eta_min) * (1 + np.cos(0.8 * np.pi)) / 2)
  # Moving every step instead: the cosine reaches down to eta_min at the end of each cycle.
  smooth = steps.make_schedule(lr, 100, 0, kind="cosine_restarts", steps_per_epoch=10,
                               restart_epochs=2, min_lr=eta_min, per_epoch=False)
  assert float(smooth(10)) == pytest.approx((lr + eta_min) / 2, rel=1e-5)
  assert float(smooth(19)) < 2e-6 and float(smooth(20)) == pytest.approx(lr)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    steps.make_schedule(lr, 100, 0, kind="cosine_restarts")
  with pytest.raises(ValueError, match="unknown schedule"):
    steps.make_schedule(lr, 100, 0, kind="step")


def _records(tmp_path, n=42):
  return write_task_shards(tmp_path / "records", "stage2", n, size=16)


def _read_log(workdir):
  return [json.loads(l) for l in (workdir / "log.jsonl").read_text().splitlines()]


def _train_losses(workdir):
  return {r["step"]: r["loss"] for r in _read_log(workdir) if "loss" in r}


def test_kill_and_resume_matches_an_unbroken_run(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "build_model", lambda config, seed, fold=None, devices=None: TinySeq(rngs=nnx.Rngs(seed, dropout=seed + 1)))
  records = _records(tmp_path)
  cfg = tiny_config(max_steps=6, checkpoint_every=0)
  cfg.records_dir = str(records)
  full = loop.train_fold(cfg, tmp_path / "full", records, 0)
  assert full["finished"] and full["steps_per_epoch"] == 3 and full["best_score"] is not None
  # Interrupted run: stops (as if killed) after step 4, then a new call resumes from step 4.
  part = loop.train_fold(tiny_config(max_steps=6, stop_at_step=4), tmp_path / "part", records, 0)
  assert part["step"] == 4 and not part["finished"]
  lines = []
  resumed = loop.train_fold(tiny_config(max_steps=6), tmp_path / "part", records, 0,
                            log=lines.append)
  assert resumed["finished"] and resumed["resumed_from"] == 4 and full["resumed_from"] is None
  assert lines == [f"fold 0 ({tmp_path / 'part'}): resumed from the checkpoint of step 4 of 6"]
  a, b = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "part")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for s in a:
    assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-7), s
  # Validation each epoch with the competition metric; OOF predictions of the best epoch.
  vals = [r for r in _read_log(tmp_path / "full") if "val_competition_loss" in r]
  assert [r["step"] for r in vals] == [3, 6]
  oof = pd.read_csv(tmp_path / "full" / "oof_predictions.csv", dtype={"StudyInstanceUID": str})
  assert list(oof.columns) == ["StudyInstanceUID", "patient_overall"] + [f"C{i}" for i in range(1, 8)] + ["fold"]
  assert len(oof) == 2 and set(oof["fold"]) == {0}
  p = oof[[f"C{i}" for i in range(1, 8)]].to_numpy()
  np.testing.assert_allclose(oof["patient_overall"], 1 - np.prod(1 - p, axis=1), rtol=1e-6)
  assert any((tmp_path / "full" / "tensorboard").iterdir())
  training.learning_curves(tmp_path / "full", "tiny")  # what the pipeline draws after training
  assert (tmp_path / "full" / "learning_curves.png").stat().st_size > 1000


def test_nan_loss_stops_with_the_step_number(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "build_model",
                      lambda config, seed, fold=None, devices=None: TinySeq(rngs=nnx.Rngs(seed), nan_after=4))
  records = _records(tmp_path)
  cfg = tiny_config(max_steps=9)
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 5 .*last good checkpoint is step 3"):
    loop.train_fold(cfg, tmp_path / "run", records, 0)
  ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert ckpts == ["3"]


def test_distributed_environment_detection():
  assert not runtime.wants_distributed({})
  assert runtime.wants_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert runtime.wants_distributed({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
  assert not runtime.wants_distributed({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
  assert runtime.wants_distributed({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert runtime.distributed_args({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}) == {
      "num_processes": 4, "process_id": 2}
  assert runtime.distributed_args({"SLURM_JOB_ID": "7"}) == {}  # JAX detects SLURM by itself
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    runtime.distributed_args({"JAX_PROCESS_ID": "two"})
  assert runtime.heartbeat_timeout({}) == runtime.DEFAULT_HEARTBEAT_S
  assert runtime.heartbeat_timeout({runtime.HEARTBEAT_ENV: "15"}) == 15
  with pytest.raises(ValueError, match=runtime.HEARTBEAT_ENV):
    runtime.heartbeat_timeout({runtime.HEARTBEAT_ENV: "0"})
  # One process: no error is another process's fault.
  assert not runtime.is_peer_failure(RuntimeError("Gloo all-reduce failed: Connection closed"))
  assert runtime.lost_processes(RuntimeError("UNAVAILABLE: Task 1 heartbeat timeout. This")) == [1]
  assert runtime.lost_processes(RuntimeError(
      "The following tasks are unhealthy (stopped sending heartbeats):\n1\n3\nThe tasks")) == [1, 3]
  assert runtime.lost_processes(RuntimeError("Connection closed by peer [127.0.0.1]:2")) == []
  assert runtime.lost_processes(RuntimeError(
      "DEADLINE_EXCEEDED: Barrier timed out. Id: x::0.\n# of tasks that reached the barrier: 2/4.\n"
      "The first task at the barrier: 0. Some timed out task names:\n1\n3\n\n\nRPC: /x")) == [1, 3]


def test_a_rerun_says_where_it_starts():
  assert loop.resume_note("fold 0", None, 6, 6) is None
  assert loop.resume_note("fold 0", 4, 6, 6) == "fold 0: resumed from the checkpoint of step 4 of 6"
  assert loop.resume_note("fold 0", 6, 6, 6) == (
      "fold 0: restored step 6 of 6 from its checkpoint; training had finished, nothing left to "
      "train")
  assert "nothing to train before train.stop_at_step=4" in loop.resume_note("fold 0", 4, 6, 4)


class TinyImage(nnx.Module):
  """(B, [D,] H, W, C) -> the outputs a task expects (dict / array), for the task plumbing tests."""

  def __init__(self, task: str, channels: int, *, rngs: nnx.Rngs):
    self.task = task
    self.conv = nnx.Conv(channels, 8, (3, 3), strides=(2, 2), rngs=rngs)
    self.head = nnx.Linear(8, 18, rngs=rngs)

  def __call__(self, x):
    if x.ndim == 5:  # a volume: fold depth into the batch
      b = x.shape[0]
      x = x.reshape((-1,) + x.shape[2:])
      f = jax.nn.relu(self.conv(x)).mean((1, 2)).reshape(b, -1, 8).mean(1)
    else:
      f = jax.nn.relu(self.conv(x)).mean((1, 2))
    z = self.head(f)
    if self.task == "cnn3d":
      return z[:, :8]
    if self.task == "slices2d":
      return z[:, :14]  # single-head style: presence then fracture
    return {"presence": z[:, :7], "box": jax.nn.sigmoid(z[:, 7:11]), "area": z[:, 11:18]}


@pytest.mark.parametrize("task", ["stage1", "cnn3d", "slices2d"])
def test_every_task_trains_and_scores(tmp_path, task):
  from cspine_jax.inputs import loader as loader_lib
  write_task_shards(tmp_path, task, 28, size=16)
  index = loader_lib.record_index(tmp_path, task)
  loader = loader_lib.make_loader(index.source(), task, batch_size=8, train=False, seed=0,
                              shard_options=grain.sharding.NoSharding())
  mesh = sharding.make_mesh()
  channels = 1 if task == "cnn3d" else 3
  tx = steps.make_tx(steps.make_schedule(1e-2, 10, 1), weight_decay=0.0, clip_norm=1.0)
  trainer = steps.Trainer(TinyImage(task, channels, rngs=nnx.Rngs(0)), tx, tasks.get(task), mesh)
  coll = {}
  for b in loader:
    b = loop._pad(b, 8)
    gb = sharding.shard_batch(b, mesh)
    trainer.state, m = trainer.train_step(trainer.state, gb)
    assert math.isfinite(float(m["loss"]))
    out, _ = trainer.eval_step(trainer.state, gb)
    keep = np.asarray(out["mask"]) > 0
    for k, v in out.items():
      coll.setdefault(k, []).append(np.asarray(v)[keep])
  coll = {k: np.concatenate(v) for k, v in coll.items()}
  assert sorted(coll["record_id"].tolist()) == list(range(28))
  if task == "stage1":
    s = tasks.stage1_scores(coll)
    assert 0 <= s["presence_accuracy"] <= 1 and s["box_l1"] >= 0
    return
  labels_df, preds = tasks.study_frames(task, coll, index.study_uid, overall="max")
  assert len(labels_df) == len(preds) == 4
  assert 0 < metrics.competition_loss(labels_df, preds) < 10
  if task == "slices2d":
    p = preds[[f"C{i}" for i in range(1, 8)]].to_numpy()
    np.testing.assert_allclose(preds["patient_overall"], p.max(axis=1))


def test_bfloat16_compute_keeps_float32_params():
  """A model built with dtype=bfloat16 (config.model.dtype) computes in bf16, params/updates stay f32."""
  mesh = sharding.make_mesh()
  tx = steps.make_tx(steps.make_schedule(3e-2, 8, 1), weight_decay=1e-5, clip_norm=1.0)
  model = TinySeq(rngs=nnx.Rngs(0, dropout=1), dtype=jnp.bfloat16)
  trainer = steps.Trainer(model, tx, tasks.get("stage2"), mesh)
  batch = sharding.shard_batch(_batch(), mesh)
  out, _ = trainer.eval_step(trainer.state, batch)
  assert out["prob"].dtype == jnp.float32  # losses and probabilities in float32
  losses_ = []
  for _ in range(8):
    trainer.state, m = trainer.train_step(trainer.state, batch)
    losses_.append(float(m["loss"]))
  assert all(math.isfinite(v) for v in losses_) and losses_[-1] < losses_[0]
  params = nnx.state(nnx.merge(trainer.graphdef, trainer.state)[0], nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  inputs = trainer.prepare_step(steps.optimizer_step(trainer.state), batch)
  lowered = trainer.update_step.lower(trainer.state, inputs).as_text()
  assert "bf16" in lowered


def test_train_step_augments_on_the_device_and_eval_does_not():
  """uint8 batches: the train step turns/flips each sample by draws of (seed, step); eval only
  normalises, so two trainers that differ only in augmentation evaluate alike."""
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  host = dict(_batch(), images=rng.integers(0, 255, (16, 8, 8, 8, 3), dtype=np.uint8))
  batch = sharding.shard_batch(host, mesh)
  tx = steps.make_tx(optax.constant_schedule(1e-2), weight_decay=0.0, clip_norm=None)

  def make(augment, seed=0):
    return steps.Trainer(TinySeq(rngs=nnx.Rngs(0, dropout=1)), tx, tasks.get("stage2"), mesh,
                         augment=augment, augment_seed=seed)

  plain, aug, aug2 = make(None), make(augment_lib.AugmentOptions()), make(augment_lib.AugmentOptions())
  e_plain, m_plain = plain.eval_step(plain.state, batch)
  e_aug, m_aug = aug.eval_step(aug.state, batch)
  np.testing.assert_array_equal(np.asarray(e_plain["prob"]), np.asarray(e_aug["prob"]))
  assert float(m_plain["loss"]) == float(m_aug["loss"])
  # The eval step sees exactly the host normalisation.
  x = augment_lib.normalize(host["images"])
  want = plain.model()(x, host["vertebra"])
  np.testing.assert_allclose(np.asarray(e_plain["prob"]), np.asarray(jax.nn.sigmoid(want)),
                             rtol=1e-5, atol=1e-6)
  # Train steps: the augmented loss differs from the plain one, and the same seed repeats it.
  losses_ = {}
  for name, t in (("plain", plain), ("aug", aug), ("aug2", aug2)):
    out = []
    for _ in range(2):
      t.state, m = t.train_step(t.state, batch)
      out.append(float(m["loss"]))
    losses_[name] = out
  assert losses_["aug"] == losses_["aug2"]
  assert losses_["aug"][0] != losses_["plain"][0]
  # Each step draws anew: fold_in of the optimizer step.
  a0, _ = augment_lib.augment_draws(aug.augment_key(0), 16, aug.augment)
  a1, _ = augment_lib.augment_draws(aug.augment_key(1), 16, aug.augment)
  assert not np.allclose(np.asarray(a0), np.asarray(a1))


def test_model_initialised_in_one_program_matches_eager_construction(caplog):
  import logging

  from configs import cnn3d as cnn3d_config
  from cspine_jax import models
  cfg = cnn3d_config.get_config("cpu")
  make = lambda: models.make_model(cfg.model, rngs=models.make_rngs(3))  # noqa: E731
  eager = nnx.state(make())
  with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
    jitted = nnx.state(loop.init_in_one_program(make))
  compiles = [r for r in caplog.records if r.getMessage().startswith("Finished XLA compilation")]
  assert len(compiles) == 1, [r.getMessage() for r in compiles]
  assert jax.tree.structure(eager) == jax.tree.structure(jitted)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # above the size limit a CPU model is built eagerly: the same values, no one-program compile
  with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.DEBUG), jax.log_compiles(True):
    mp.setattr(loop, "ONE_PROGRAM_MAX_VALUES", 1000)
    caplog.clear()
    large = nnx.state(loop.init_in_one_program(make))
  assert not [r for r in caplog.records if "jit(<lambda>)" in r.getMessage()
              and r.getMessage().startswith("Finished XLA compilation")]
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(large)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_members_per_fold_are_averaged_out_of_fold(tmp_path, monkeypatch):
  seeds = []

  def build(config, seed, fold=None, devices=None):
    seeds.append(seed)
    return TinySeq(rngs=nnx.Rngs(seed, dropout=seed + 1))

  monkeypatch.setattr(loop, "build_model", build)
  records = _records(tmp_path)
  cfg = tiny_config(max_steps=3)
  cfg.fold = 1
  cfg.train.members = 2
  cfg.eval.top_n = 2
  out = loop.train_and_evaluate(cfg, tmp_path / "run", records)
  assert [r["member"] for r in out["folds"]] == [0, 1]
  assert seeds == [1, 1 + loop.MEMBER_SEED_STRIDE]  # member 0 keeps the single model's seed
  first, second = (pd.read_csv(tmp_path / "run" / d / "oof_predictions.csv",
                               dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
                   for d in ("fold_1", "fold_1_member_1"))
  merged = pd.read_csv(out["oof_predictions"], dtype={"StudyInstanceUID": str}
                       ).set_index("StudyInstanceUID").loc[first.index]
  vert = [f"C{i}" for i in range(1, 8)]
  assert not np.allclose(first[vert], second.loc[first.index, vert])  # two different models
  mean = (first[vert] + second.loc[first.index, vert]) / 2
  np.testing.assert_allclose(merged[vert], mean, rtol=1e-9)
  top2 = np.sort(mean.to_numpy(), axis=1)[:, -2:]
  np.testing.assert_allclose(merged["patient_overall"], 1 - np.prod(1 - top2, axis=1), rtol=1e-9)
  assert set(merged["fold"]) == {1}
  # ensemble.fold_dirs finds both members: the inference ensemble averages them.
  from cspine_jax.infer import ensemble
  assert [d.name for d in ensemble.fold_dirs(tmp_path / "run")] == ["fold_1", "fold_1_member_1"]


def test_the_headline_checkpoint_follows_a_rule_fixed_in_advance(tmp_path, monkeypatch):
  """train.select="last" (the default): the out-of-fold file and the checkpoint inference uses are
  the last epoch's, whatever the validation fold said; the best-on-fold epoch is kept beside it
  under its own name. train.select="best" picks that one instead (selected on the fold)."""
  monkeypatch.setattr(loop, "build_model", lambda config, seed, fold=None, devices=None:
                      TinySeq(rngs=nnx.Rngs(seed, dropout=seed + 1)))
  records = _records(tmp_path)
  scores = iter([0.2, 0.9, 0.2, 0.9])  # epoch 1 looks best on the fold, epoch 2 is the last
  real = loop.evaluate

  def evaluate(*args, **kwargs):
    got, preds = real(*args, **kwargs)
    return dict(got, score=next(scores)), preds

  monkeypatch.setattr(loop, "evaluate", evaluate)
  read = lambda p: pd.read_csv(p, dtype={"StudyInstanceUID": str})
  for select in ("last", "best"):
    run = tmp_path / select
    summary = loop.train_fold(tiny_config(max_steps=6, select=select), run, records, 0)
    assert (summary["select"], summary["best_step"], summary["last_score"]) == (select, 3, 0.9)
    chosen = loop.OOF_FILES[select]
    pd.testing.assert_frame_equal(read(run / loop.OOF), read(run / chosen))
    assert not read(run / loop.OOF_FILES["best"]).equals(read(run / loop.OOF_FILES["last"]))
    ck = checkpoints.Checkpointer(run / "checkpoints", async_save=False)
    assert ck.selected_step() == (6 if select == "last" else 3)
    ck.close()
  with pytest.raises(ValueError, match="train.select"):
    loop.selection(tiny_config(select="first"))
