"""launch.py and the configs: variants, command-line overrides, the paper defaults."""
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import cnn3d, multi_head, single_head, stage1, stage2
import launch

REPO = pathlib.Path(__file__).resolve().parents[1]


def _parse(*args):
  argv = ["launch.py", *args]
  fv = flags.FlagValues()
  # config_flags reads the overrides from sys.argv (as in a real launch).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_overrides_reach_every_field():
  c = _parse(f"--config={REPO}/configs/stage2.py:cpu", "--config.optimizer.lr=3e-4",
             "--config.data_dir=/data/rsna", "--config.fold=-1", "--config.train.epochs=3",
             "--config.model.dtype=bfloat16", "--config.input.augment.enabled=False",
             "--config.prepare.image_size=(96, 96)")
  assert c.optimizer.lr == 3e-4 and c.data_dir == "/data/rsna" and c.fold == -1
  assert c.train.epochs == 3 and c.model.dtype == "bfloat16" and not c.input.augment.enabled
  assert tuple(c.prepare.image_size) == (96, 96)
  assert c.model.encoder == "convnext_test"  # the :cpu variant was applied


def test_unknown_field_is_rejected():
  with pytest.raises((flags.Error, AttributeError, KeyError), match="learning_rate"):
    _parse(f"--config={REPO}/configs/stage2.py", "--config.optimizer.learning_rate=1")


def test_paper_defaults_and_cpu_variants():
  c = stage2.get_config()
  assert (c.model.encoder, tuple(c.prepare.image_size), c.optimizer.lr, c.optimizer.weight_decay,
          c.input.batch_size, c.train.epochs) == ("convnext_tiny", (224, 224), 1e-4, 1e-5, 8, 20)
  for module in (stage1, stage2, cnn3d, single_head, multi_head):
    cpu = module.get_config("cpu")
    assert max(cpu.prepare.image_size) <= 64 and cpu.train.epochs <= 2
    assert cpu.num_folds == cpu.prepare.num_folds
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")
  assert multi_head.get_config().model.encoder == "efficientnet_v2_s"
  assert single_head.get_config().eval.overall == "max"


def test_default_workdir():
  assert launch.default_workdir("configs/stage2.py:cpu") == "runs/stage2_cpu"
  assert launch.default_workdir("configs/stage1.py") == "runs/stage1"


def test_launch_without_config_explains_itself():
  out = subprocess.run([sys.executable, "launch.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0 and "--config is required" in out.stderr
