"""timm -> Flax weights: ConvNeXt features equal timm's, strict key/shape checks, stem adaptation,
orbax import folders and the importer CLI. No torch: fixtures are committed safetensors files made
by tests/fixtures/timm/make_fixtures.py."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from cspine_jax.models import pretrained
from cspine_jax.models.cpu import native

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "timm"
CONVNEXT = FIXTURES / "convnext_atto.safetensors"
EFFNET = FIXTURES / "efficientnetv2_test.safetensors"


def _io(name):
  io = load_file(str(FIXTURES / f"{name}.io.safetensors"))
  return np.transpose(io["input"], (0, 2, 3, 1)), io


@nnx.jit
def _features(enc, x):
  return enc(x)


def _eval_features(enc, x):
  enc.eval()
  return np.asarray(_features(enc, x))


@pytest.mark.parametrize("method", ["lax", "shifted", "native"])
def test_convnext_atto_matches_timm(method):
  if method == "native":
    native.load_once()  # what a run's start does; building a model never builds the kernels
  x, io = _io("convnext_atto")
  enc = pretrained.build_encoder("convnext_atto", abstract=True, dw_method=method)
  report = pretrained.load_pretrained(enc, CONVNEXT)
  assert report.family == "convnext" and report.stem_adapted_from is None
  assert report.num_tensors == len(pretrained.encoder_arrays(enc))
  got = _eval_features(enc, x)
  assert got.shape == io["features"].shape == (2, 320)
  assert np.abs(got - io["features"]).max() <= 1e-4


def test_mapping_layouts_on_known_tensors():
  sd = load_file(str(CONVNEXT))
  enc = pretrained.build_encoder("convnext_atto", abstract=True)
  pretrained.load_pretrained(enc, CONVNEXT)
  arrays = pretrained.encoder_arrays(enc)
  np.testing.assert_array_equal(arrays["stem_conv.kernel"],
                                sd["stem.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arrays["stages.2.blocks.3.conv_dw.kernel"],
                                sd["stages.2.blocks.3.conv_dw.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arrays["stages.1.blocks.0.mlp_fc1.kernel"],
                                sd["stages.1.blocks.0.mlp.fc1.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(arrays["stages.3.downsample_norm.scale"],
                                sd["stages.3.downsample.0.weight"])
  np.testing.assert_array_equal(arrays["head_norm.bias"], sd["head.norm.bias"])
  e = pretrained.build_encoder("efficientnet_v2_test", abstract=True)
  pretrained.load_pretrained(e, EFFNET)
  esd = load_file(str(EFFNET))
  ea = pretrained.encoder_arrays(e)
  np.testing.assert_array_equal(ea["blocks.4.1.bn2.var"], esd["blocks.4.1.bn2.running_var"])
  np.testing.assert_array_equal(ea["blocks.4.1.se.conv_reduce.kernel"],
                                esd["blocks.4.1.se.conv_reduce.weight"].transpose(2, 3, 1, 0))


def test_linear_mlp_layout_and_wrappers():
  # convnext_tiny and up store mlp.fc* as nn.Linear (out, in); atto's conv_mlp stores 1x1 convs.
  # Both, under a {'state_dict': {'module.' + key}} wrapper, give the same parameters.
  sd = load_file(str(CONVNEXT))
  linear = {("module." + k): (v[:, :, 0, 0] if ".mlp.fc" in k and v.ndim == 4 else v)
            for k, v in sd.items()}
  cleaned = pretrained.clean_state_dict({"state_dict": linear, "epoch": 3})
  assert set(cleaned) == set(sd)
  a = pretrained.build_encoder("convnext_atto", abstract=True)
  b = pretrained.build_encoder("convnext_atto", abstract=True)
  pretrained.load_pretrained(a, CONVNEXT)
  conv, unmatched = pretrained.convert_timm(cleaned, pretrained.FAMILIES["convnext"])
  assert not unmatched
  pretrained.assign(b, conv, "<wrapped>")
  got = pretrained.encoder_arrays(b)
  for k, v in pretrained.encoder_arrays(a).items():
    np.testing.assert_array_equal(got[k], v)


def _write(tmp_path, sd, name="bad.safetensors"):
  path = tmp_path / name
  save_file(sd, str(path))
  return path


def test_mismatched_files_name_the_keys(tmp_path):
  sd = load_file(str(CONVNEXT))
  missing = dict(sd)
  del missing["stages.2.blocks.4.norm.weight"]
  extra = dict(sd, **{"stages.1.blocks.9.gamma": np.ones(80, np.float32),
                      "head.pre_logits.weight": np.ones(3, np.float32)})
  shaped = dict(sd, **{"stages.3.blocks.1.mlp.fc2.weight": np.ones((320, 640, 1, 1), np.float32)})
  cases = {
      "missing.safetensors": (missing, ["1 missing keys", "stages.2.blocks.4.norm.scale"]),
      "extra.safetensors": (extra, ["unexpected keys (no convnext rule): head.pre_logits.weight",
                                    "stages.1.blocks.9.gamma (-> stages.1.blocks.9.gamma)"]),
      "shape.safetensors": (shaped, ["stages.3.blocks.1.mlp.fc2.weight",
                                     "file (640, 320) vs encoder (1280, 320)"]),
  }
  for name, (bad, needles) in cases.items():
    enc = pretrained.build_encoder("convnext_atto", abstract=True)
    path = _write(tmp_path, bad, name)
    with pytest.raises(pretrained.WeightsError) as err:
      pretrained.load_pretrained(enc, path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
      assert needle in msg, (name, msg)
    # nothing was copied: the abstract encoder still holds shapes only
    assert isinstance(enc.head_norm.scale.get_value(), jax.ShapeDtypeStruct)
  # a ConvNeXt file into an EfficientNetV2 encoder fails on every key, not silently
  enc = pretrained.build_encoder("efficientnet_v2_test", abstract=True)
  with pytest.raises(pretrained.WeightsError, match="no efficientnet_v2 rule"):
    pretrained.load_pretrained(enc, CONVNEXT)


@pytest.mark.parametrize("name,stem_key", [("convnext_atto", "stem_conv.kernel"),
                                           ("efficientnetv2_test", "conv_stem.kernel")])
def test_in_chans_adaptation_equals_timm(name, stem_key):
  _, io = _io(name)
  model = {"convnext_atto": "convnext_atto", "efficientnetv2_test": "efficientnet_v2_test"}[name]
  for c in (1, 5):
    enc = pretrained.build_encoder(model, in_chans=c, abstract=True)
    report = pretrained.load_pretrained(enc, FIXTURES / f"{name}.safetensors")
    assert report.stem_adapted_from == 3
    got = pretrained.encoder_arrays(enc)[stem_key]
    want = io[f"stem_in{c}"].transpose(2, 3, 1, 0)  # timm's adapt_input_conv, OIHW -> HWIO
    assert got.shape[2] == c
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # 3 channels (the 2.5D input) is used as it is
  k = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
  assert pretrained.adapt_stem_kernel(k, 3) is k


def _cli(*argv, env=None):
  """(exit status, stdout, stderr) of ``python -m cspine_jax.weights ARGV`` (never imported here:
  absl flags are process-global)."""
  proc = subprocess.run([sys.executable, "-m", "cspine_jax.weights", *map(str, argv)],
                        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
                        env=None if env is None else {**os.environ, **env})
  return proc.returncode, proc.stdout, proc.stderr


def test_import_cli_and_orbax_roundtrip(tmp_path):
  out = tmp_path / "effnet_import"
  rc, stdout, stderr = _cli("import", "--source", EFFNET, "--model", "efficientnet_v2_test",
                            "--out", out)
  assert rc == 0 and "imported 206 tensors" in stdout, (stdout, stderr)
  meta = json.loads((out / pretrained.META_FILE).read_text())
  assert (meta["model"], meta["family"], meta["variant"], meta["in_chans"]) == (
      "efficientnet_v2_test", "efficientnet_v2", "test", 3)
  assert meta["shapes"]["conv_stem.kernel"] == [3, 3, 3, 8]
  direct = pretrained.build_encoder("efficientnet_v2_test", abstract=True, dw_method="lax")
  pretrained.load_pretrained(direct, EFFNET)
  restored = pretrained.build_encoder("efficientnet_v2_test", abstract=True, dw_method="lax")
  report = pretrained.load_pretrained(restored, out)
  assert report.num_tensors == 206
  a, b = pretrained.encoder_arrays(direct), pretrained.encoder_arrays(restored)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  x, io = _io("efficientnetv2_test")
  got = _eval_features(restored, x)
  np.testing.assert_array_equal(got, _eval_features(direct, x))
  assert np.abs(got - io["features"]).max() <= 1e-4
  # the imported folder also adapts the stem, and refuses another family or a second import
  one = pretrained.build_encoder("efficientnet_v2_test", in_chans=1, abstract=True)
  assert pretrained.load_pretrained(one, out).stem_adapted_from == 3
  with pytest.raises(pretrained.WeightsError, match="holds efficientnet_v2 weights"):
    pretrained.load_pretrained(pretrained.build_encoder("convnext_test", abstract=True), out)
  rc, stdout, stderr = _cli("import", "--source", EFFNET, "--model", "efficientnet_v2_test",
                            "--out", out)
  assert rc == 1 and not stdout and "already exists" in stderr


def test_import_reports_bad_inputs(tmp_path):
  with pytest.raises(pretrained.WeightsError,
                     match="weights do not fit the efficientnet_v2 test encoder"):
    pretrained.import_timm(CONVNEXT, "efficientnet_v2_test", tmp_path / "o")
  with pytest.raises(pretrained.WeightsError, match="unknown model name 'resnet50'"):
    pretrained.import_timm(CONVNEXT, "resnet50", tmp_path / "o")
  with pytest.raises(pretrained.WeightsError, match="unknown convnext variant 'huge'"):
    pretrained.parse_model_name("convnext_huge")
  assert not (tmp_path / "o").exists()


def test_cli_stem_adaptation_and_usage_errors(tmp_path):
  # --in-chans (the argparse spelling) still works beside absl's --in_chans.
  rc, stdout, stderr = _cli("import", "--source", CONVNEXT, "--model", "convnext_atto",
                            "--out", tmp_path / "one", "--in-chans", "1")
  assert rc == 0 and "stem adapted from 3 to 1 channels" in stdout, (stdout, stderr)
  assert json.loads((tmp_path / "one" / pretrained.META_FILE).read_text())["in_chans"] == 1
  rc, _, stderr = _cli("export", "--model", "convnext_atto")
  assert rc != 0 and "unknown command 'export'; expected one of: fetch, import" in stderr
  rc, _, stderr = _cli("import", "--model", "convnext_atto")
  assert rc != 0 and "import needs --source, --out" in stderr


def test_unreadable_sources(tmp_path):
  enc = pretrained.build_encoder("convnext_test", abstract=True)
  with pytest.raises(pretrained.WeightsError, match="weights file not found"):
    pretrained.load_pretrained(enc, tmp_path / "nope.safetensors")
  bad = tmp_path / "w.npz"
  bad.write_bytes(b"x")
  with pytest.raises(pretrained.WeightsError, match="unsupported weights file type '.npz'"):
    pretrained.load_pretrained(enc, bad)
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x00" * 16)
  with pytest.raises(pretrained.WeightsError, match="cannot read safetensors"):
    pretrained.load_pretrained(enc, junk)
  (tmp_path / "folder").mkdir()
  with pytest.raises(pretrained.WeightsError, match="not an imported weights folder"):
    pretrained.load_pretrained(enc, tmp_path / "folder")
  pth = tmp_path / "w.pth"
  pth.write_bytes(b"not a zip")
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    want = "torch.load"
  except ImportError:
    want = "needs torch, which is not installed"
  with pytest.raises(pretrained.WeightsError, match=want):
    pretrained.load_pretrained(enc, pth)


def test_config_pretrained_loads_the_encoder_for_training(tmp_path):
  """`--config.model.pretrained=FOLDER` (an imported folder) sets the stage-2 encoder's weights."""
  from configs import stage2
  from cspine_jax.train import loop
  source = pretrained.build_encoder("convnext_test")
  rng = np.random.default_rng(0)  # values no init would give
  nnx.update(source, jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                                  nnx.state(source, nnx.Param)))
  folder = pretrained.save_converted(source, tmp_path / "enc", model="convnext_test")
  config = stage2.get_config("cpu")
  config.model.pretrained = str(folder)
  model = loop.build_model(config, seed=0)
  want, got = pretrained.encoder_arrays(source), pretrained.encoder_arrays(model.encoder)
  assert set(want) == set(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  config.model.name, config.model.pretrained = "cnn3d", str(folder)
  with pytest.raises(ValueError, match="no image encoder"):
    loop.build_model(config, seed=0)


class _Position:
  """A data iterator's saved position (the checkpoint stores one with the model)."""

  def get_state(self) -> bytes:
    return b"{}"


def test_pretrained_from_the_same_folds_training_run(tmp_path):
  """`model.pretrained=RUN/box_refine/fold_{fold}` starts fold k from the box refiner's fold-k
  encoder (a training run folder, restored from its checkpoint); a run of another fold, a path
  with {fold} but no fold, and a run folder without a checkpoint are refused."""
  from configs import box_refine, stage2
  from cspine_jax.train import checkpoints, loop, sharding
  source_config = box_refine.get_config("cpu")
  runs = tmp_path / "run" / "box_refine"
  want = {}
  for fold in (0, 1):
    trainer = loop.make_trainer(source_config, 10, sharding.make_mesh(1), seed=10 + fold)
    ck = checkpoints.Checkpointer(runs / f"fold_{fold}" / "checkpoints", async_save=False)
    ck.save(3, trainer.state, _Position(), {"task": "box_refine", "fold": fold,
                                             "model": source_config.model.to_dict()}, score=0.1)
    ck.close()
    want[fold] = pretrained.encoder_arrays(trainer.model().encoder)
  config = stage2.get_config("cpu")
  config.model.pretrained = str(runs / "fold_{fold}")
  for fold in (0, 1):
    got = pretrained.encoder_arrays(loop.build_model(config, seed=0, fold=fold).encoder)
    assert set(got) == set(want[fold])
    for k in got:
      np.testing.assert_array_equal(got[k], want[fold][k])
  assert not np.array_equal(want[0]["stem_conv.kernel"], want[1]["stem_conv.kernel"])
  with pytest.raises(ValueError, match="needs a fold"):
    loop.build_model(config, seed=0)
  config.model.pretrained = str(runs / "fold_1")
  with pytest.raises(ValueError, match="trained for fold 1 .*cannot start fold 0"):
    loop.build_model(config, seed=0, fold=0)
  (runs / "fold_2" / "checkpoints").mkdir(parents=True)
  config.model.pretrained = str(runs / "fold_{fold}")
  with pytest.raises(pretrained.WeightsError, match="fold_2: cannot restore its model"):
    loop.build_model(config, seed=0, fold=2)


# ----------------------------------------------------- timm tags through the Hugging Face cache
# Made-up tags whose architectures map to the fixtures' encoders; the hub never hears of them.
ATTO_TAG = "convnext_atto.cspine_fixture"
TF_TEST_TAG = "tf_efficientnetv2_test.cspine_fixture"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(cache: pathlib.Path, tag: str, source: pathlib.Path) -> pathlib.Path:
  """``source`` as huggingface_hub lays out timm/<tag>/model.safetensors in its cache: the bytes
  in blobs/<sha256>, refs/main naming a commit, snapshots/<commit>/ linking to the blob."""
  repo = cache / f"models--timm--{tag}"
  blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
  blob.parent.mkdir(parents=True)
  shutil.copyfile(source, blob)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(COMMIT)
  snapshot = repo / "snapshots" / COMMIT
  snapshot.mkdir(parents=True)
  (snapshot / pretrained.HUB_FILE).symlink_to(os.path.relpath(blob, snapshot))
  return snapshot / pretrained.HUB_FILE


def test_timm_tags_name_their_encoders():
  assert pretrained.timm_model_name("convnext_tiny.fb_in22k_ft_in1k") == "convnext_tiny"
  assert pretrained.timm_model_name("tf_efficientnetv2_s.in21k_ft_in1k") == "efficientnet_v2_tf_s"
  assert pretrained.timm_model_name("efficientnetv2_s") == "efficientnet_v2_s"
  assert pretrained.timm_model_name(ATTO_TAG) == "convnext_atto"
  with pytest.raises(pretrained.WeightsError, match="'resnet50' .* has no encoder here"):
    pretrained.timm_model_name("resnet50.a1_in1k")
  with pytest.raises(pretrained.WeightsError, match="unknown efficientnet_v2 variant 'rw_s'"):
    pretrained.timm_model_name("efficientnetv2_rw_s.ra2_in1k")
  with pytest.raises(pretrained.WeightsError, match="not a timm tag"):
    pretrained.converted_dir("../convnext_tiny")
  assert pretrained.is_test_size("convnext_test")
  assert pretrained.is_test_size("efficientnet_v2_tf_test")
  assert not pretrained.is_test_size("convnext_atto")


def test_fetch_cli_offline_from_the_hugging_face_cache(tmp_path):
  """`weights fetch TAG` with HF_HUB_OFFLINE=1 takes the file huggingface_hub cached under HF_HOME
  and converts it into the weights cache; again: kept; a tag not cached: a clear error."""
  _hub_cache(tmp_path / "hf" / "hub", ATTO_TAG, CONVNEXT)
  _hub_cache(tmp_path / "hf" / "hub", TF_TEST_TAG, FIXTURES / "tf_efficientnetv2_test.safetensors")
  env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": "",
         pretrained.CACHE_ENV: str(tmp_path / "weights")}
  rc, stdout, stderr = _cli("fetch", ATTO_TAG, TF_TEST_TAG, env=env)
  assert rc == 0, stderr
  assert f"model.pretrained='timm:{ATTO_TAG}'" in stdout and "converted" in stdout
  for tag, model in ((ATTO_TAG, "convnext_atto"), (TF_TEST_TAG, "efficientnet_v2_tf_test")):
    meta = json.loads((tmp_path / "weights" / tag / pretrained.META_FILE).read_text())
    assert meta["model"] == model and COMMIT in meta["source"], meta["source"]
  rc, stdout, stderr = _cli("fetch", ATTO_TAG, "convnext_atto.not_cached", env=env)
  assert rc == 1 and "already converted as convnext_atto" in stdout
  assert ("timm/convnext_atto.not_cached/model.safetensors: not in the Hugging Face cache "
          f"{tmp_path / 'hf' / 'hub'}") in stderr, stderr


def test_timm_pretrained_is_found_at_model_build_never_downloaded(tmp_path, monkeypatch):
  """model.pretrained='timm:TAG' builds from the Hugging Face cache, then from the converted
  folder (which wins); a tag on neither names the fetch command; the wrong encoder is refused;
  'none' is a random start. huggingface_hub's download is never called."""
  from configs import stage2
  from cspine_jax.train import loop
  from cspine_jax.train import warm_start
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "weights"))

  def no_download(*args, **kwargs):
    raise AssertionError(f"download during a model build: {args}")

  monkeypatch.setattr(pretrained.huggingface_hub, "hf_hub_download", no_download)
  hub_file = _hub_cache(tmp_path / "hub", ATTO_TAG, CONVNEXT)
  want = pretrained.build_encoder("convnext_atto", abstract=True)
  pretrained.load_pretrained(want, CONVNEXT)
  want = pretrained.encoder_arrays(want)

  def check(encoder):
    got = pretrained.encoder_arrays(encoder)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])

  config = stage2.get_config("cpu")
  config.model.encoder = "convnext_atto"
  config.model.pretrained = f"timm:{ATTO_TAG}"
  assert pretrained.resolve_timm(ATTO_TAG) == hub_file
  check(loop.build_model(config, seed=0).encoder)
  # The converted folder is preferred (the hub copy may go: e.g. only the converted cache is
  # carried to an offline machine).
  pretrained.import_timm(hub_file, "convnext_atto", pretrained.converted_dir(ATTO_TAG))
  shutil.rmtree(tmp_path / "hub")
  assert pretrained.resolve_timm(ATTO_TAG) == tmp_path / "weights" / ATTO_TAG

  def holder(name="convnext_atto"):  # what init_encoder needs of a model: its encoder
    return types.SimpleNamespace(encoder=pretrained.build_encoder(name, abstract=True))

  model = holder()
  report = warm_start.init_encoder(model, f"timm:{ATTO_TAG}", fold=None)
  assert report.source == str(tmp_path / "weights" / ATTO_TAG)
  check(model.encoder)
  # Nowhere on this machine: the error says what to run.
  with pytest.raises(pretrained.WeightsError,
                     match="run `python -m cspine_jax.weights fetch convnext_atto.elsewhere`"):
    warm_start.init_encoder(holder(), "timm:convnext_atto.elsewhere", fold=0)
  # Weights for another encoder (the TF EfficientNetV2 into a ConvNeXt; the same shapes into the
  # non-TF EfficientNetV2 would load silently wrong).
  with pytest.raises(pretrained.WeightsError, match="holds efficientnet_v2_tf_test weights; the "
                     "encoder is efficientnet_v2_test"):
    warm_start.init_encoder(holder("efficientnet_v2_test"), f"timm:{TF_TEST_TAG}", fold=0)
  # 'none': an explicit random start, the model left as built.
  model = holder()
  assert warm_start.init_encoder(model, "none", fold=0) is None
  assert isinstance(model.encoder.stem_conv.kernel.get_value(), jax.ShapeDtypeStruct)


def test_require_pretrained_refuses_a_silent_random_start(tmp_path):
  """A method config with require_pretrained=True refuses a full-size encoder whose
  model.pretrained is unset, and names the fix; 'none', a timm tag, init_from and test-size
  encoders pass."""
  from configs import demo
  from cspine_jax.pipeline import training
  run = tmp_path / "run"
  config = demo.get_config()
  config.require_pretrained = True
  for name in config.models:  # the demo's test-size encoders start at random, as always
    training.model_config(config, name, run)
  config.models.stage1.model.encoder = "convnext_tiny"
  with pytest.raises(ValueError, match=r"models.stage1: its convnext_tiny encoder would start from "
                     r"random weights.*'timm:convnext_tiny.fb_in22k_ft_in1k' \(after `python -m "
                     r"cspine_jax.weights fetch convnext_tiny.fb_in22k_ft_in1k`\), or 'none'"):
    training.model_config(config, "stage1", run)
  for value in ("none", "timm:convnext_tiny.fb_in22k_ft_in1k"):
    config.models.stage1.model.pretrained = value
    assert training.model_config(config, "stage1", run).model.pretrained == value
  config.models.stage2.model.encoder = "convnext_tiny"  # starts from the box refiner's encoder
  assert "box_refine" in training.model_config(config, "stage2", run).model.pretrained
  config.models.stage1.model.pretrained = None
  config.require_pretrained = False
  assert training.model_config(config, "stage1", run).model.pretrained is None
