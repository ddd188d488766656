"""EfficientNetV2 encoder: timm's structure and rounding, features equal timm's, train/eval modes.

Encoders are built abstractly (`nnx.eval_shape`) and filled from the committed timm fixtures
(tests/fixtures/timm, made by make_fixtures.py): a random init costs tens of seconds of per-shape
compiles on 2 shared CPU cores.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from cspine_jax.models import pretrained
from cspine_jax.models import efficientnet_v2 as effnet
from cspine_jax.models import layers

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "timm"

# timm 1.0.31 `_gen_efficientnetv2_s` at multipliers 0.25 / 0.25 and 1.0 / 1.0, read off the
# built torch modules: per stage (block kind, blocks, in, mid, out, first stride, SE width).
TIMM_PLAN = {
    "test": (8, 320, [("cn", 1, 8, 8, 8, 1, 0), ("er", 1, 8, 32, 16, 2, 0),
                      ("er", 1, 16, 64, 16, 2, 0), ("ir", 2, 16, 64, 32, 2, 4),
                      ("ir", 3, 32, 192, 40, 1, 8), ("ir", 4, 40, 240, 64, 2, 10)]),
    "s": (24, 1280, [("cn", 2, 24, 24, 24, 1, 0), ("er", 4, 24, 96, 48, 2, 0),
                     ("er", 4, 48, 192, 64, 2, 0), ("ir", 6, 64, 256, 128, 2, 16),
                     ("ir", 9, 128, 768, 160, 1, 32), ("ir", 15, 160, 960, 256, 2, 40)]),
}
# timm parameter count (torch .parameters() minus the 320*1000+1000 classifier).
TIMM_NUM_PARAMS = {"test": 681618 - 321000}


def _abstract(variant, **kw):
  return nnx.eval_shape(lambda: effnet.EfficientNetV2(variant, rngs=nnx.Rngs(0), **kw))


def _loaded(fixture, variant, **kw):
  enc = _abstract(variant, **kw)
  pretrained.load_pretrained(enc, FIXTURES / f"{fixture}.safetensors")
  return enc


def _io(fixture):
  io = load_file(str(FIXTURES / f"{fixture}.io.safetensors"))
  return np.transpose(io["input"], (0, 2, 3, 1)), io["features"]


@nnx.jit
def _features(enc, x):
  return enc(x)


def _block_shape(block):
  first = getattr(block, {"cn": "conv", "er": "conv_exp", "ir": "conv_pw"}[block.kind])
  mid = first.out_features
  out = block.conv.out_features if block.kind == "cn" else block.conv_pwl.out_features
  se = block.se.conv_reduce.out_features if block.se is not None else 0
  return first.in_features, mid, out, se


def test_stage_plan_matches_timm_s():
  # The full-size plan, without building the 20M-parameter module (slow under eval_shape).
  stem, num_features, stages = TIMM_PLAN["s"]
  spec = effnet.VARIANTS["s"]
  assert effnet.round_channels(spec.stem_size, spec.channel_multiplier) == stem
  assert effnet.round_channels(spec.num_features, spec.channel_multiplier) == num_features
  plan = effnet.stage_plan(spec)
  for blocks, (kind, n, cin, mid, cout, stride, se) in zip(plan, stages, strict=True):
    first = blocks[0]
    assert (len(blocks), first["kind"], first["in_chs"], first["out_chs"], first["stride"]) == (
        n, kind, cin, cout, stride)
    assert effnet.make_divisible(cin * first["exp_ratio"]) == mid
    if se:
      assert round(mid * first["se_ratio"] / first["exp_ratio"]) == se


def test_structure_matches_timm():
  stem, num_features, stages = TIMM_PLAN["test"]
  enc = _abstract("test")
  assert enc.conv_stem.out_features == stem
  assert enc.num_features == num_features
  assert len(enc.blocks) == len(stages)
  for stage, (kind, n, cin, mid, cout, stride, se) in zip(enc.blocks, stages):
    assert len(stage) == n
    assert all(b.kind == kind for b in stage)
    assert _block_shape(stage[0]) == (cin, mid, cout, se)
    first_conv = stage[0].conv_dw if kind == "ir" else (stage[0].conv if kind == "cn"
                                                        else stage[0].conv_exp)
    strides = getattr(first_conv, "strides", None) or (first_conv.stride,) * 2
    assert tuple(strides) == (stride, stride)
    # only stride-1 blocks with equal widths keep the residual, like timm's has_skip
    assert [b.has_skip for b in stage] == [stride == 1 and cin == cout] + [True] * (n - 1)
  n_params = sum(p.size for p in jax.tree.leaves(nnx.state(enc, nnx.Param)))
  assert n_params == TIMM_NUM_PARAMS["test"]


def test_rounding_rules():
  assert effnet.make_divisible(6) == 8  # never below the divisor
  assert effnet.make_divisible(36.0) == 40  # 32 would be more than 10% below 36
  assert effnet.round_channels(24, 0.25) == 8
  assert effnet.round_channels(1280, 0.25) == 320
  assert effnet.scale_depth(15, 0.25) == 4  # ceil
  assert effnet.same_pads(64, 3, 2) == (0, 1)  # TF puts the odd pixel at the end
  assert effnet.same_pads(65, 3, 2) == (1, 1)
  assert effnet.same_pads(48, 3, 1) == (1, 1)


@pytest.mark.parametrize("fixture,variant,method", [
    ("efficientnetv2_test", "test", "lax"),
    ("efficientnetv2_test", "test", "shifted"),
    ("tf_efficientnetv2_test", "tf_test", "shifted"),
])
def test_features_match_timm(fixture, variant, method):
  x, want = _io(fixture)
  enc = _loaded(fixture, variant, dw_method=method)
  enc.eval()
  got = np.asarray(_features(enc, x))
  assert got.dtype == np.float32 and got.shape == want.shape == (2, enc.num_features)
  assert np.abs(got - want).max() <= 1e-4
  assert np.abs(want).max() > 0.5  # the reference is not degenerate


def test_padding_variant_matters():
  # The same weights under the other padding rule give clearly different features.
  x, want = _io("tf_efficientnetv2_test")
  enc = _loaded("tf_efficientnetv2_test", "test", dw_method="shifted")
  enc.eval()
  assert np.abs(np.asarray(_features(enc, x)) - want).max() > 1e-2


def test_bfloat16_compute_is_close_and_returns_float32():
  x, want = _io("efficientnetv2_test")
  enc = _loaded("efficientnetv2_test", "test", dtype=jnp.bfloat16, dw_method="lax")
  enc.eval()
  got = np.asarray(_features(enc, x))
  assert got.dtype == np.float32
  assert np.abs(got - want).max() < 0.1


def test_train_mode_batch_stats_and_drop_path():
  x, want = _io("efficientnetv2_test")
  enc = _loaded("efficientnetv2_test", "test", drop_path_rate=0.5, dw_method="lax")
  blocks = [b for stage in enc.blocks for b in stage]
  # timm's EfficientNet schedule: rate * block_index / num_blocks (residual blocks only).
  for i, b in enumerate(blocks):
    assert b.drop_path.rate == pytest.approx(0.5 * i / len(blocks) if b.has_skip else 0.0)
  for b in blocks:  # the abstract build has no real keys; give each drop path a stream
    if b.drop_path.rate > 0:
      b.drop_path.rngs = nnx.Rngs(dropout=7).dropout.fork()
  mean_before = np.asarray(enc.bn2.mean.get_value())
  enc.train()
  y1 = np.asarray(_features(enc, x))
  y2 = np.asarray(_features(enc, x))
  assert not np.allclose(y1, y2)  # drop path draws new masks each call
  assert not np.allclose(np.asarray(enc.bn2.mean.get_value()), mean_before)  # running stats move
  assert np.abs(y1 - want).max() > 1e-2  # batch statistics, not the running ones


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown EfficientNetV2 variant 'xl'"):
    _abstract("xl")
  enc = _abstract("test")
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    enc(jnp.zeros((1, 3, 64, 64)))
  with pytest.raises(ValueError, match="depthwise conv method"):
    _abstract("test", dw_method="fft")


def test_depthwise_layer_is_shared():
  enc = _abstract("test")
  assert isinstance(enc.blocks[3][0].conv_dw, layers.DepthwiseConv2d)
