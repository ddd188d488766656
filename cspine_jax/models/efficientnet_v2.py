"""EfficientNetV2 encoder (Tan & Le 2021) in Flax NNX, named after timm's efficientnetv2 modules.

Structure (timm's `_gen_efficientnetv2_s`): stem 3x3/2 conv + BN + SiLU; six stages of
  0: ConvBnAct   (3x3 conv + BN + SiLU, residual)                                "cn"
  1-2: FusedMBConv / EdgeResidual (3x3 expand conv + BN + SiLU, 1x1 project + BN) "er"
  3-5: MBConv / InvertedResidual  (1x1 expand + BN + SiLU, 3x3 depthwise + BN + SiLU,
       squeeze-excite, 1x1 project + BN)                                         "ir"
then head 1x1 conv to `num_features` + BN + SiLU and global average pooling (timm's pre-logits).
A block has a residual (with drop path) when stride is 1 and in == out channels. Drop path rates
rise linearly as `drop_path_rate * block_index / num_blocks` (timm's EfficientNet rule).

Width and depth follow timm's rounding: channels `make_divisible(c * channel_multiplier, 8)`
(never below 8 nor 10% under the target), expansion widths `make_divisible(in * exp_ratio)`,
SE width `round(mid * se_ratio / exp_ratio)`, repeats `ceil(r * depth_multiplier)`.

Padding: timm's non-tf variants pad symmetrically ((stride - 1) + (k - 1)) // 2; the `tf_`
variants (the ones with ImageNet weights, e.g. `tf_efficientnetv2_s.in21k_ft_in1k`) use
TensorFlow "SAME" padding (asymmetric for stride 2) and BatchNorm eps 1e-3 instead of 1e-5.
BatchNorm momentum is 0.9 in Flax terms (torch's 0.1); the running variance uses the biased
batch variance (torch uses the unbiased one), which matters only for fine-tuning statistics.

Parameter naming: every module keeps timm's name, so a timm key maps by its leaf only:
  conv_stem / blocks.{i}.{j}.{conv,conv_exp,conv_pw,conv_dw,conv_pwl,se.conv_reduce,
  se.conv_expand} / conv_head `.weight` (O,I,kh,kw) -> `.kernel` (kh,kw,I,O) ('.bias' kept);
  bn1 / bn2 / blocks.{i}.{j}.bn{1,2,3} `.weight/.bias/.running_mean/.running_var` ->
  `.scale/.bias/.mean/.var`; `classifier.*` is not used. See `cspine_jax.weights`.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import layers

Array = jax.Array
Dtype = Any


class StageDef(NamedTuple):
  """One stage of timm's arch_def string, e.g. 'ir_r6_k3_s2_e4_c128_se0.25'."""
  kind: str  # "cn" (ConvBnAct), "er" (EdgeResidual / FusedMBConv), "ir" (InvertedResidual)
  repeats: int
  kernel: int
  stride: int
  exp_ratio: float
  out_chs: int
  se_ratio: float = 0.0


# timm `_gen_efficientnetv2_s` arch_def (the paper's Table 4); 'cn_..._skip' keeps the residual.
ARCH_S: tuple[StageDef, ...] = (
    StageDef("cn", 2, 3, 1, 1.0, 24),
    StageDef("er", 4, 3, 2, 4.0, 48),
    StageDef("er", 4, 3, 2, 4.0, 64),
    StageDef("ir", 6, 3, 2, 4.0, 128, 0.25),
    StageDef("ir", 9, 3, 1, 6.0, 160, 0.25),
    StageDef("ir", 15, 3, 2, 6.0, 256, 0.25),
)


class Variant(NamedTuple):
  arch: tuple[StageDef, ...]
  channel_multiplier: float
  depth_multiplier: float
  tf_same: bool  # TF "SAME" padding and BN eps 1e-3 (timm's tf_ variants)
  stem_size: int = 24
  num_features: int = 1280


VARIANTS: dict[str, Variant] = {
    # timm efficientnetv2_s (no ImageNet weights in timm, symmetric padding).
    "s": Variant(ARCH_S, 1.0, 1.0, tf_same=False),
    # timm tf_efficientnetv2_s (ImageNet-1k / 21k weights): the paper's multi-head encoder.
    "tf_s": Variant(ARCH_S, 1.0, 1.0, tf_same=True),
    # Small sizes for tests; these equal the committed timm fixtures in tests/fixtures/timm.
    "test": Variant(ARCH_S, 0.25, 0.25, tf_same=False),
    "tf_test": Variant(ARCH_S, 0.25, 0.25, tf_same=True),
}

BN_EPS = 1e-5
BN_EPS_TF = 1e-3
BN_MOMENTUM = 0.9  # Flax decay = 1 - torch momentum 0.1


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """timm's make_divisible: nearest multiple of `divisor`, at least min_value, >= 90% of v."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


def round_channels(channels: int, multiplier: float) -> int:
  """timm's round_channels (the generator's round_chs_fn)."""
  return make_divisible(channels * multiplier) if multiplier else channels


def scale_depth(repeats: int, depth_multiplier: float) -> int:
  """timm's default 'ceil' depth truncation for a one-definition stage."""
  return int(math.ceil(repeats * depth_multiplier))


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow "SAME" padding (low, high) along one axis, as timm's pad_same."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _he_fan_out() -> Any:
  # timm's _init_weight_goog for convs: normal(0, sqrt(2 / fan_out)).
  return nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(din: int, dout: int, k: int, stride: int, tf_same: bool, *, dtype: Dtype,
          param_dtype: Dtype, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Conv:
  # lax "SAME" equals TF/timm pad_same; otherwise timm's symmetric get_padding.
  pad = (stride - 1 + k - 1) // 2
  padding = "SAME" if tf_same else ((pad, pad), (pad, pad))
  return nnx.Conv(din, dout, (k, k), strides=(stride, stride), padding=padding,
                  use_bias=use_bias, kernel_init=_he_fan_out(), dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)


def _bn(ch: int, tf_same: bool, *, dtype: Dtype, param_dtype: Dtype,
        rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(ch, momentum=BN_MOMENTUM, epsilon=BN_EPS_TF if tf_same else BN_EPS,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class DepthwiseConv(layers.DepthwiseConv2d):
  """`layers.DepthwiseConv2d` without bias, timm's init, and optional TF "SAME" padding."""

  def __init__(self, ch: int, k: int, stride: int, tf_same: bool, *, method: str,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    super().__init__(ch, k, stride=stride, padding=0 if tf_same else (stride - 1 + k - 1) // 2,
                     use_bias=False, method=method, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.tf_same = tf_same
    # timm's goog init: a depthwise conv's fan_out is k*k (per group), not k*k*C. (set_value,
    # not `[...] =`: the latter probes `.sharding`, which is slow on tracers under eval_shape.)
    self.kernel.set_value(jax.random.normal(rngs.params(), (k, k, 1, ch), param_dtype)
                          * math.sqrt(2.0 / (k * k)))

  def __call__(self, x: Array) -> Array:
    if self.tf_same:  # padding depends on the input size, so it is applied per call
      ph = same_pads(x.shape[1], self.kernel_size, self.stride)
      pw = same_pads(x.shape[2], self.kernel_size, self.stride)
      x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    return super().__call__(x)


class SqueezeExcite(nnx.Module):
  """timm SqueezeExcite: mean pool -> 1x1 conv_reduce -> SiLU -> 1x1 conv_expand -> sigmoid gate."""

  def __init__(self, ch: int, rd: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # 1x1 convs on the pooled map keep timm's kernel layout (and its mapping) unchanged.
    self.conv_reduce = nnx.Conv(ch, rd, (1, 1), use_bias=True, kernel_init=_he_fan_out(), **kw)
    self.conv_expand = nnx.Conv(rd, ch, (1, 1), use_bias=True, kernel_init=_he_fan_out(), **kw)

  def __call__(self, x: Array) -> Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.conv_expand(jax.nn.silu(self.conv_reduce(s)))
    return x * jax.nn.sigmoid(s)


class Block(nnx.Module):
  """One EfficientNetV2 block of kind "cn", "er" or "ir" (attribute names are timm's)."""

  def __init__(self, kind: str, in_chs: int, out_chs: int, *, kernel: int, stride: int,
               exp_ratio: float, se_ratio: float, drop_path: float, tf_same: bool,
               dw_method: str, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.kind = kind
    self.has_skip = stride == 1 and in_chs == out_chs
    mid = make_divisible(in_chs * exp_ratio)
    self.se = nnx.data(None)
    if kind == "cn":
      self.conv = _conv(in_chs, out_chs, kernel, stride, tf_same, **kw)
      self.bn1 = _bn(out_chs, tf_same, **kw)
    elif kind == "er":
      self.conv_exp = _conv(in_chs, mid, kernel, stride, tf_same, **kw)
      self.bn1 = _bn(mid, tf_same, **kw)
      self.conv_pwl = _conv(mid, out_chs, 1, 1, tf_same, **kw)
      self.bn2 = _bn(out_chs, tf_same, **kw)
    elif kind == "ir":
      self.conv_pw = _conv(in_chs, mid, 1, 1, tf_same, **kw)
      self.bn1 = _bn(mid, tf_same, **kw)
      self.conv_dw = DepthwiseConv(mid, kernel, stride, tf_same, method=dw_method, **kw)
      self.bn2 = _bn(mid, tf_same, **kw)
      self.conv_pwl = _conv(mid, out_chs, 1, 1, tf_same, **kw)
      self.bn3 = _bn(out_chs, tf_same, **kw)
    else:
      raise ValueError(f"unknown EfficientNetV2 block kind {kind!r}; expected cn, er or ir")
    if se_ratio and kind != "cn":
      # timm builder (se_from_exp=False): the ratio is relative to the block input width.
      self.se = SqueezeExcite(mid, round(mid * se_ratio / exp_ratio), **kw)
    self.drop_path = layers.DropPath(drop_path if self.has_skip else 0.0, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    shortcut = x
    if self.kind == "cn":
      x = jax.nn.silu(self.bn1(self.conv(x)))
    elif self.kind == "er":
      x = jax.nn.silu(self.bn1(self.conv_exp(x)))
      if self.se is not None:
        x = self.se(x)
      x = self.bn2(self.conv_pwl(x))
    else:
      x = jax.nn.silu(self.bn1(self.conv_pw(x)))
      x = jax.nn.silu(self.bn2(self.conv_dw(x)))
      if self.se is not None:
        x = self.se(x)
      x = self.bn3(self.conv_pwl(x))
    if self.has_skip:
      x = self.drop_path(x) + shortcut
    return x


def stage_plan(variant: Variant) -> list[list[dict[str, Any]]]:
  """Per stage, per block: kind, in/out channels, kernel, stride, exp/se ratios (timm rules)."""
  in_chs = round_channels(variant.stem_size, variant.channel_multiplier)
  plan = []
  for sd in variant.arch:
    out_chs = round_channels(sd.out_chs, variant.channel_multiplier)
    blocks = []
    for j in range(scale_depth(sd.repeats, variant.depth_multiplier)):
      blocks.append(dict(kind=sd.kind, in_chs=in_chs, out_chs=out_chs, kernel=sd.kernel,
                         stride=sd.stride if j == 0 else 1, exp_ratio=sd.exp_ratio,
                         se_ratio=sd.se_ratio))
      in_chs = out_chs
    plan.append(blocks)
  return plan


class EfficientNetV2(nnx.Module):
  """EfficientNetV2 encoder following the contract in `cspine_jax.models` (pooled pre-logits).

  `channel_multiplier` / `depth_multiplier`, when given, override the variant's. `dw_method` is the
  depthwise conv's form ("native" | "shifted" | "lax", see `layers`); `registry.make_model`
  chooses it for the devices the model runs on.
  """

  def __init__(self, variant: str = "s", *, in_chans: int = 3, drop_path_rate: float = 0.0,
               channel_multiplier: float | None = None, depth_multiplier: float | None = None,
               dw_method: str = "lax", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    layers.check_method(dw_method)
    if variant not in VARIANTS:
      raise ValueError(f"unknown EfficientNetV2 variant {variant!r}; known: {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    if channel_multiplier is not None:
      spec = spec._replace(channel_multiplier=channel_multiplier)
    if depth_multiplier is not None:
      spec = spec._replace(depth_multiplier=depth_multiplier)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.variant = variant
    self.in_chans = in_chans
    self.dtype = dtype
    self.dw_method = dw_method
    self.tf_same = spec.tf_same
    plan = stage_plan(spec)
    stem = round_channels(spec.stem_size, spec.channel_multiplier)
    self.num_features = round_channels(spec.num_features, spec.channel_multiplier)
    self.conv_stem = _conv(in_chans, stem, 3, 2, spec.tf_same, **kw)
    self.bn1 = _bn(stem, spec.tf_same, **kw)
    total = sum(len(s) for s in plan)
    idx = 0
    stages = []
    for stage in plan:
      blocks = []
      for b in stage:
        blocks.append(Block(b["kind"], b["in_chs"], b["out_chs"], kernel=b["kernel"],
                            stride=b["stride"], exp_ratio=b["exp_ratio"],
                            se_ratio=b["se_ratio"], drop_path=drop_path_rate * idx / total,
                            tf_same=spec.tf_same, dw_method=dw_method, **kw))
        idx += 1
      stages.append(nnx.List(blocks))
    self.blocks = nnx.List(stages)
    self.conv_head = _conv(plan[-1][-1]["out_chs"], self.num_features, 1, 1, spec.tf_same, **kw)
    self.bn2 = _bn(self.num_features, spec.tf_same, **kw)

  def forward_features(self, x: Array) -> Array:
    """(N, H, W, in_chans) -> head feature map (N, H/32, W/32, num_features), compute dtype."""
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise ValueError(f"EfficientNetV2 wants (N, H, W, {self.in_chans}) input; got {x.shape}")
    x = jax.nn.silu(self.bn1(self.conv_stem(x.astype(self.dtype))))
    for stage in self.blocks:
      for block in stage:
        x = block(x)
    return jax.nn.silu(self.bn2(self.conv_head(x)))

  def __call__(self, x: Array) -> Array:
    """(N, H, W, in_chans) -> globally average-pooled features (N, num_features) float32."""
    return jnp.mean(self.forward_features(x).astype(jnp.float32), axis=(1, 2))
