"""ConvNeXt encoder (Liu et al. 2022) in Flax NNX, named after timm's `convnext_*` modules.

Design: patchify stem (4x4 stride-4 conv + LayerNorm); four stages; stages 1..3 open with
LayerNorm + 2x2 stride-2 conv; each block is 7x7 depthwise conv -> LayerNorm -> Linear(4C) ->
exact GELU -> Linear(C) -> layer scale `gamma` (init 1e-6) -> drop path + residual. Features are
global-average-pooled and normalised by `head_norm` (timm's `head.norm`, the "pre-logits"
features). LayerNorm eps is 1e-6 as in timm. Drop path rates rise linearly over all blocks.

Parameter naming (timm state-dict key -> this module's `nnx.state` path; PyTorch layouts on the
left, Flax layouts on the right):

  stem.0.weight (O,I,4,4)                      -> stem_conv.kernel (4,4,I,O)
  stem.0.bias                                  -> stem_conv.bias
  stem.1.weight / .bias                        -> stem_norm.scale / .bias
  stages.{i}.downsample.0.weight / .bias       -> stages.{i}.downsample_norm.scale / .bias (i>=1)
  stages.{i}.downsample.1.weight (O,I,2,2)     -> stages.{i}.downsample_conv.kernel (2,2,I,O)
  stages.{i}.downsample.1.bias                 -> stages.{i}.downsample_conv.bias
  stages.{i}.blocks.{j}.conv_dw.weight (C,1,7,7) -> stages.{i}.blocks.{j}.conv_dw.kernel (7,7,1,C)
  stages.{i}.blocks.{j}.conv_dw.bias           -> stages.{i}.blocks.{j}.conv_dw.bias
  stages.{i}.blocks.{j}.norm.weight / .bias    -> stages.{i}.blocks.{j}.norm.scale / .bias
  stages.{i}.blocks.{j}.mlp.fc1.weight (4C,C)  -> stages.{i}.blocks.{j}.mlp_fc1.kernel (C,4C)
  stages.{i}.blocks.{j}.mlp.fc1.bias           -> stages.{i}.blocks.{j}.mlp_fc1.bias
  stages.{i}.blocks.{j}.mlp.fc2.weight (C,4C)  -> stages.{i}.blocks.{j}.mlp_fc2.kernel (4C,C)
  stages.{i}.blocks.{j}.mlp.fc2.bias           -> stages.{i}.blocks.{j}.mlp_fc2.bias
  stages.{i}.blocks.{j}.gamma (C,)             -> stages.{i}.blocks.{j}.gamma
  head.norm.weight / .bias                     -> head_norm.scale / .bias
  head.fc.*                                    -> (not used: the encoder stops at pre-logits)

Conv kernels: torch (O, I, kh, kw) -> transpose (2, 3, 1, 0); linears: torch (out, in) -> .T.
Stage 0 has no downsample (timm's `stages.0.downsample` is Identity), so its
`downsample_norm`/`downsample_conv` are None. With `in_chans != 3` the weights code adapts
`stem.0.weight` before copying.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import layers

Array = jax.Array
Dtype = Any
LN_EPS = 1e-6


class Variant(NamedTuple):
  depths: tuple[int, int, int, int]
  dims: tuple[int, int, int, int]


VARIANTS: dict[str, Variant] = {
    "test": Variant((1, 1, 1, 1), (8, 16, 32, 64)),
    "atto": Variant((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": Variant((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": Variant((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": Variant((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": Variant((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": Variant((3, 3, 27, 3), (96, 192, 384, 768)),
}


def _layer_norm(dim: int, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _linear(din: int, dout: int, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, kernel_init=layers.trunc_normal, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def _conv(din: int, dout: int, k: int, dtype: Dtype, param_dtype: Dtype,
          rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(din, dout, (k, k), strides=(k, k), padding="VALID",
                  kernel_init=layers.trunc_normal, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


def _patch_conv(conv: nnx.Conv, x: Array, method: str) -> Array:
  """`conv(x)` (k x k stride k, VALID) through `layers.patch_conv`: same parameters and result;
  `method` (the model's `dw_method`) also picks its CPU gradient form."""
  kernel = conv.kernel[...].astype(conv.dtype)
  y = layers.patch_conv(x.astype(conv.dtype), kernel, method=method)
  return layers.add_bias(y, conv.bias[...].astype(conv.dtype), method=method)


def _normed_patch_conv(norm: nnx.LayerNorm, conv: nnx.Conv, x: Array, method: str,
                       fold: bool) -> Array:
  """`conv(norm(x))`. With `fold` (training), where the activation is larger than the kernel,
  the norm's scale s and shift t are folded into the conv (as in the blocks, see
  `ConvNeXtBlock`): conv(xhat s + t, W) + b = conv(xhat, W s) + (b + sum_{i,j,c} t_c W_ijc)."""
  dt = conv.dtype
  kernel = conv.kernel[...].astype(dt)
  scale, shift = norm.scale[...].astype(dt), norm.bias[...].astype(dt)
  xhat = layers.normalize(x.astype(dt), norm.epsilon, method=method)
  bias = conv.bias[...].astype(dt)
  if not fold or x.size <= kernel.size:
    return layers.add_bias(layers.patch_conv(xhat * scale + shift, kernel, method=method), bias,
                           method=method)
  y = layers.patch_conv(xhat, kernel * scale[:, None], method=method)
  return layers.add_bias(y, bias + jnp.einsum("ijco,c->o", kernel, shift), method=method)


class ConvNeXtBlock(nnx.Module):
  """x + drop_path(gamma * fc2(gelu(fc1(norm(conv_dw(x))))))."""

  def __init__(self, dim: int, *, drop_path: float = 0.0, ls_init_value: float = 1e-6,
               dw_method: str = "lax", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.dw_method = dw_method
    self.conv_dw = layers.DepthwiseConv2d(dim, 7, method=dw_method, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
    self.norm = _layer_norm(dim, dtype, param_dtype, rngs)
    self.mlp_fc1 = _linear(dim, 4 * dim, dtype, param_dtype, rngs)
    self.mlp_fc2 = _linear(4 * dim, dim, dtype, param_dtype, rngs)
    self.gamma = nnx.Param(jnp.full((dim,), ls_init_value, param_dtype))
    self.drop_path = layers.DropPath(drop_path, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    if self.dw_method == "lax":  # the library modules, autodiff
      y = self.conv_dw(x)
      y = self.norm(y)
      y = self.mlp_fc1(y)
      y = layers.gelu(y)  # timm's nn.GELU: the exact erf form
      y = self.mlp_fc2(y)
      y = y * self.gamma[...].astype(self.dtype)
      return x + self.drop_path(y)
    # CPU form, same parameters and function. In training, on maps with more rows than fc1 has
    # outputs, the LayerNorm's affine part is folded into fc1 ((xhat s + t) W1 + b1 = xhat (s W1)
    # + (t W1 + b1)) and the layer scale into fc2 ((a W2 + b2) gamma = a (W2 gamma) + b2 gamma):
    # the folds act on the weight matrices, so the full-size scale multiplies and their
    # column-sum gradients disappear. Elsewhere (eval mode: no backward to save, and the folded
    # weights cost more than they save; ConvNeXt's last stage: weights larger than the
    # activations) they are applied as usual, fused into the elementwise work around them. The
    # conv + normalisation and both linears take their CPU forms (`DepthwiseConv2d.normalized`,
    # `layers.dense`).
    dt, m = self.dtype, self.dw_method
    w1, b1 = self.mlp_fc1.kernel[...].astype(dt), self.mlp_fc1.bias[...].astype(dt)
    w2, b2 = self.mlp_fc2.kernel[...].astype(dt), self.mlp_fc2.bias[...].astype(dt)
    scale, shift = self.norm.scale[...].astype(dt), self.norm.bias[...].astype(dt)
    gamma = self.gamma[...].astype(dt)
    rows = x.size // x.shape[-1]
    if self.drop_path.deterministic or rows <= w1.shape[1]:
      y = self.conv_dw.normalized(x, LN_EPS, scale, shift)  # the affine part inside the call
      y = layers.dense(y, w1, b1, method=m)
      y = layers.dense(layers.gelu(y), w2, b2, method=m) * gamma
    else:
      y = self.conv_dw.normalized(x, LN_EPS)
      y = layers.dense(y, scale[:, None] * w1, shift @ w1 + b1, method=m)
      y = layers.dense(layers.gelu(y), w2 * gamma, b2 * gamma, method=m)
    return x + self.drop_path(y)


class ConvNeXtStage(nnx.Module):
  """Optional LayerNorm + 2x2/2 conv downsample, then `depth` blocks."""

  def __init__(self, in_dim: int, dim: int, depth: int, *, downsample: bool,
               drop_paths: list[float], dw_method: str, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.dw_method = dw_method
    if downsample:
      self.downsample_norm = _layer_norm(in_dim, dtype, param_dtype, rngs)
      self.downsample_conv = _conv(in_dim, dim, 2, dtype, param_dtype, rngs)
    else:
      self.downsample_norm = nnx.data(None)
      self.downsample_conv = nnx.data(None)
    self.blocks = nnx.List([
        ConvNeXtBlock(dim, drop_path=drop_paths[j], dw_method=dw_method, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs) for j in range(depth)])

  def __call__(self, x: Array) -> Array:
    if self.downsample_conv is not None:
      if self.dw_method == "lax":
        x = _patch_conv(self.downsample_conv, self.downsample_norm(x), self.dw_method)
      else:  # CPU form: the LayerNorm's affine part folded into the conv when training
        x = _normed_patch_conv(self.downsample_norm, self.downsample_conv, x, self.dw_method,
                               fold=not self.blocks[0].drop_path.deterministic)
    for block in self.blocks:
      x = block(x)
    return x


class ConvNeXt(nnx.Module):
  """ConvNeXt encoder following the contract in `cspine_jax.models` (pooled pre-logits).

  `dw_method` is the layer form ("native" | "shifted" | "lax", see `layers`); `registry.make_model`
  chooses it for the devices the model runs on.
  """

  def __init__(self, variant: str = "tiny", *, in_chans: int = 3, drop_path_rate: float = 0.0,
               dw_method: str = "lax", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    layers.check_method(dw_method)
    if variant not in VARIANTS:
      raise ValueError(f"unknown ConvNeXt variant {variant!r}; known: {sorted(VARIANTS)}")
    depths, dims = VARIANTS[variant]
    self.variant = variant
    self.in_chans = in_chans
    self.dims = dims
    self.depths = depths
    self.num_features = dims[-1]
    self.dtype = dtype
    self.dw_method = dw_method
    self.stem_conv = _conv(in_chans, dims[0], 4, dtype, param_dtype, rngs)
    self.stem_norm = _layer_norm(dims[0], dtype, param_dtype, rngs)
    rates = layers.drop_path_rates(depths, drop_path_rate)
    self.stages = nnx.List([
        ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0,
                      drop_paths=rates[i], dw_method=dw_method, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs) for i in range(4)])
    self.head_norm = _layer_norm(dims[-1], dtype, param_dtype, rngs)

  def forward_features(self, x: Array) -> Array:
    """(N, H, W, in_chans) -> last feature map (N, H/32, W/32, dims[-1]) in the compute dtype."""
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise ValueError(f"ConvNeXt wants (N, H, W, {self.in_chans}) input; got {x.shape}")
    x = _patch_conv(self.stem_conv, x.astype(self.dtype), self.dw_method)
    if self.dw_method == "lax":
      x = self.stem_norm(x)
    else:  # the same LayerNorm, with col_sum gradients for its scale and shift
      norm = self.stem_norm
      x = layers.layer_norm(x, norm.scale[...].astype(self.dtype),
                            norm.bias[...].astype(self.dtype), norm.epsilon, method=self.dw_method)
    for stage in self.stages:
      x = stage(x)
    return x

  def __call__(self, x: Array) -> Array:
    """(N, H, W, in_chans) -> pooled, head-normalised features (N, num_features) float32."""
    feats = self.forward_features(x)
    pooled = jnp.mean(feats.astype(jnp.float32), axis=(1, 2))
    return self.head_norm(pooled.astype(self.dtype)).astype(jnp.float32)
