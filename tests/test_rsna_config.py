"""configs/rsna.py: the project's and the seed's paper-size settings, and their tiny variants run
through the pipeline's first steps on a generated set."""
import json
import pathlib

import numpy as np
import pytest

from configs import rsna
from cspine_jax.io import vertebrae
from cspine_jax.pipeline import data
from cspine_jax.models import pretrained
from cspine_jax.pipeline import runner
from cspine_jax.pipeline import training
from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.records import pipeline as records_pipeline
from cspine_jax.records import shards
from cspine_jax.train import checkpoints


@pytest.mark.parametrize("variant", ["", "seed"])
def test_paper_size_configs_build_with_every_difference_on_its_side(variant):
  c = rsna.get_config(variant)
  for d in rsna.DIFFERENCES:
    for path in d.fields:
      assert rsna._get(c, path) == (d.seed if variant == "seed" else d.project), path
  options = data.options_of(c.prepare)
  want = {"": ((224, 224), (224, 224)), "seed": ((384, 384), (320, 320))}[variant]
  assert (options.for_task("stage1").image_size, options.for_task("stage2").image_size) == want
  assert options.for_task("box_refine").intensity == "window"
  assert c.models.stage2.model.encoder == "convnext_tiny" and c.prepare.num_folds == 5
  assert c.models.stage2.model.dtype == "bfloat16" and c.workers > 2
  assert c.models.stage2.input.workers > 2
  # A field of the method reaches every model (references), as in the demo.
  c.prepare.num_folds = 3
  assert c.models.stage2.num_folds == 3 and c.models.stage1.prepare.num_folds == 3


@pytest.mark.parametrize("variant", ["", "seed"])
def test_paper_size_encoders_start_from_the_imagenet_weights_made_for_them(variant):
  """Every full-size encoder names the timm tag whose weights load into it (load_timm refuses
  another encoder), and the method refuses a random start unless it is asked for."""
  c = rsna.get_config(variant)
  assert c.require_pretrained
  for name, m in c.models.items():
    if "encoder" not in m.model:
      continue
    tag = m.model.pretrained
    assert tag.startswith(pretrained.TIMM_SCHEME), name
    assert pretrained.timm_model_name(tag[len(pretrained.TIMM_SCHEME):]) == m.model.encoder, name
  assert c.models.stage1.model.pretrained == "timm:convnext_tiny.fb_in22k_ft_in1k"
  assert c.models.multi_head.model.pretrained == "timm:tf_efficientnetv2_s.in21k_ft_in1k"
  run = pathlib.Path("/nonexistent/run")
  c.models.stage1.model.pretrained = None
  with pytest.raises(ValueError, match="models.stage1: its convnext_tiny encoder would start "
                     "from random weights"):
    training.model_config(c, "stage1", run)
  c.models.stage1.model.pretrained = "none"  # --config.models.stage1.model.pretrained=none
  assert training.model_config(c, "stage1", run).model.pretrained == "none"
  tiny = rsna.get_config("seed_tiny" if variant else "tiny")
  assert not tiny.require_pretrained and tiny.models.stage1.model.pretrained is None
  training.model_config(tiny, "stage1", run)  # test-size encoders start at random


def test_each_difference_differs_and_either_side_is_one_override_away():
  fields = [f for d in rsna.DIFFERENCES for f in d.fields]
  assert len(fields) == len(set(fields))
  for d in rsna.DIFFERENCES:
    assert d.seed != d.project and d.what and d.why, d.fields
  c = rsna.get_config("seed")
  c.prepare.intensity = "window"  # the project's value on the seed's config
  assert data.options_of(c.prepare).intensity == "window"
  with pytest.raises(ValueError, match="unknown variant"):
    rsna.get_config("seed_small")


def test_markdown_table_has_a_row_per_difference_with_both_values():
  rows = rsna.markdown_table().splitlines()
  assert rows[0] == "| What | Field | Seed | Project | Why |"
  assert len(rows) == 2 + len(rsna.DIFFERENCES)
  for d, row in zip(rsna.DIFFERENCES, rows[2:]):
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[0] == d.what and cells[4] == d.why
    assert cells[1].split("<br>") == [f"`{f}`" for f in d.fields]
  assert "| `384x384` | `224x224` |" in rows[2]
  assert "| `minmax` | `window` |" in rsna.markdown_table()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> pathlib.Path:
  """The tiny variants' generated RSNA-format set, made once for both (their ``synthetic``)."""
  syn = rsna.get_config("tiny").synthetic
  assert syn == rsna.get_config("seed_tiny").synthetic
  path = tmp_path_factory.mktemp("rsna_tiny") / "data"
  data.generate(syn, path, workers=2)
  return path


def _records(workdir: pathlib.Path, task: str):
  manifest = shards.read_manifest(workdir / "records" / task)
  return manifest, records_pipeline.read_task(workdir / "records", task)


@pytest.mark.slow
def test_seed_tiny_runs_its_first_steps(tmp_path, tiny_data):
  c = rsna.get_config("seed_tiny")
  c.data_dir = str(tiny_data)
  c.steps = "data,records_stage1"
  runner.run(c, tmp_path, log=lambda _: None)
  manifest, recs = _records(tmp_path, "stage1")
  options = manifest["options"]
  assert options["image_size"] == [48, 48] and options["intensity"] == "minmax"
  assert options["fov_mask"] and options["slice_targets"] == "neighbours"
  assert "by_task" not in options  # the set's own options: what inference reads back
  # The circular field of view: the corners are zero in every image, the centre is not.
  images = np.stack([r["image"] for r in recs])
  outside = ~image_lib.fov_mask((48, 48))
  assert not images[:, outside].any() and images[:, 24, 24].any()
  # Per-slice min-max: a study's slices as its HU volume gives them through min-max, not the window.
  uid = recs[0]["study_uid"]
  image_dir, mask = study_lib.study_paths(tiny_data, uid)
  hu = study_lib.load(study_lib.StudyInput(uid, image_dir, mask, 0), with_mask=False).series.volume
  own = [r for r in recs if r["study_uid"] == uid]
  want = options_lib.Options.from_json(options)
  for r in own[::7]:
    np.testing.assert_array_equal(r["image"][..., 1], image_lib.SliceImager(want)(hu[r["index"]]))
  windowed = image_lib.SliceImager(options_lib.Options(image_size=(48, 48), fov_mask=True))
  assert any((r["image"][..., 1] != windowed(hu[r["index"]])).any() for r in own)
  # GroupKFold over the segmented studies only: a study's slices in one fold.
  truth = json.loads((tiny_data / "ground_truth.json").read_text())["studies"]
  segmented = {u for u, s in truth.items() if s["split"] == "train" and s["has_segmentation"]}
  assert set(manifest["folds"]) == segmented
  assert all(r["fold"] == manifest["folds"][r["study_uid"]] for r in recs)
  # Then stage 1 trains: the seed's head and loss, warm restarts, the best by validation loss.
  c.steps = "stage1"
  runner.run(c, tmp_path, log=lambda _: None)
  ck = checkpoints.Checkpointer(tmp_path / "run" / "stage1" / "checkpoints", async_save=False)
  meta = ck.read_meta(ck.latest_step())
  ck.close()
  assert meta["model"]["head"] == "ratio" and meta["select"] == "best"
  assert meta["select_by"] == "val_loss" and meta["record_options"]["intensity"] == "minmax"
  log = [json.loads(line) for line in
         (tmp_path / "run" / "stage1" / "log.jsonl").read_text().splitlines()]
  assert any("ratio_l1" in row for row in log) and any("val_ratio_l1" in row for row in log)
  # Pseudo-labels by the seed's rules, then stage 2's records on their own split.
  c.steps = "pseudo_labels,records_stage2"
  runner.run(c, tmp_path, log=lambda _: None)
  # Leak-free on separate splits: a segmented study's entry comes from the stage-1 model that held
  # its stage-1 fold out (only fold 0's model is trained here), whatever stage 2's split.
  steps = json.loads((tmp_path / "pipeline.json").read_text())["steps"]
  sources = next(s for s in steps if s["name"] == "pseudo_labels")["result"]["sources"]
  held_out = sorted(u for u, k in manifest["folds"].items() if k == 0)
  assert sources["out_of_fold"] == len(held_out)
  assert sorted(sources["in_sample"]) == sorted(set(manifest["folds"]) - set(held_out))
  # The seed's rules made the file and go to inference (their decoding: test_localize; a model
  # of one epoch finds no vertebra here).
  rules = json.loads((tmp_path / "run" / "inference.json").read_text())["rules"]
  assert (rules["decode"], rules["threshold"], rules["box_rule"]) == ("rolling", 0.3, "study")
  assert not rules["require_all"] and not rules["calibrate_boxes"]
  assert not json.loads((tmp_path / "run" / "inference.json").read_text())["refine"]
  located = vertebrae.read_vertebrae(tmp_path / "run" / "vertebrae.csv")
  assert set(located) == {u for u, s in truth.items() if s["split"] == "train"}
  s2, recs2 = _records(tmp_path, "stage2")
  train = {u for u, s in truth.items() if s["split"] == "train"}
  assert set(s2["folds"]) == train and s2["options"]["square_crop"]
  assert s2["options"]["image_size"] == [40, 40] and "fov_mask" not in s2["options"]
  assert {r["images"].shape for r in recs2} == {(2, 40, 40, 3)}


@pytest.mark.slow
def test_project_tiny_runs_its_first_steps(tmp_path, tiny_data):
  c = rsna.get_config("tiny")
  c.data_dir = str(tiny_data)
  c.steps = "data,records_stage1"
  runner.run(c, tmp_path, log=lambda _: None)
  manifest, _ = _records(tmp_path, "stage1")
  options = manifest["options"]
  # The project's options: window, no mask; the fields it leaves at their defaults are not in
  # the set's identity, as in sets made before those fields existed.
  assert options["image_size"] == [32, 32]
  assert not {"intensity", "fov_mask", "resize", "fold_method", "by_task"} & set(options)
  # The stratified split covers every train.csv study (every record set of the folder agrees).
  truth = json.loads((tiny_data / "ground_truth.json").read_text())["studies"]
  assert set(manifest["folds"]) == {u for u, s in truth.items() if s["split"] == "train"}
  c.steps = "stage1"
  runner.run(c, tmp_path, log=lambda _: None)
  ck = checkpoints.Checkpointer(tmp_path / "run" / "stage1" / "checkpoints", async_save=False)
  meta = ck.read_meta(ck.latest_step())
  ck.close()
  assert meta["model"]["head"] == "presence" and meta["select"] == "last"
