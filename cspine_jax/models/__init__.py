"""Flax NNX models of cspine_jax.

Modules: `layers` (depthwise conv, GELU, ConvNeXt's linear and norm ops, drop path, attention
pooling), `cpu` (their XLA:CPU and native C++ forms, and `choose_method`), `convnext` (ConvNeXt
encoder, timm naming), `efficientnet_v2` (EfficientNetV2 encoder), `sequence` (stage-2 encoder +
BiLSTM + attention pooling), `stage1` (presence/area/box heads), `cnn3d` (3D CNN baseline),
`slice2d` (2D single-head / multi-head baselines), `box_refine` (box refiner), `registry`
(`make_encoder`, `make_model`), `pretrained` (timm weights).

Encoder contract (every image encoder: `convnext.ConvNeXt`, `efficientnet_v2.EfficientNetV2`)
---------------------------------------------------------------------------------------------
Construction::

  Encoder(variant: str, *, in_chans: int = 3, drop_path_rate: float = 0.0, dw_method: str = "lax",
          dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, **variant_specific)

  - `variant` names a size from the module's `VARIANTS` dict (e.g. "atto", "tiny"; "test" is a
    tiny size for fast tests); unknown names raise ValueError listing the known ones.
  - `dw_method` is the layer form, "native" | "shifted" | "lax" (`layers`); `registry.make_model`
    chooses it for the model's devices (`cpu.choose_method`).
  - `dtype` is the compute dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype` (float32).
  - Randomness (drop path / dropout) draws from the Rngs' 'dropout' stream given at construction.

Attributes and calls::

  encoder.num_features: int                      # width of the pooled feature vector
  encoder.forward_features(x) -> (N, h, w, C)    # last feature map, compute dtype
  encoder(x) -> (N, num_features) float32        # pooled "pre-logits" features

  - `x` is (N, H, W, in_chans) float, channels-last (NHWC), already normalised; H and W should be
    multiples of 32.
  - Pooled features are returned in float32 whatever the compute dtype, so heads and losses run
    in float32.

Train / eval mode follows NNX attributes, never a call argument: stochastic modules carry
`deterministic` (drop path, dropout) and BatchNorm carries `use_running_average`. New modules
start in training mode (deterministic=False, like `nnx.Dropout`); switch with `model.eval()` /
`model.train()` or `nnx.view(model, deterministic=True, use_running_average=True)`.

Registry: `registry.make_encoder("convnext_atto" | "efficientnet_v2_s" | ..., *, rngs, **kw)`
splits the name at the family prefix and passes the rest as `variant` (so efficientnet_v2.py
exposes `EfficientNetV2` and `VARIANTS`); `registry.make_model(config.model, rngs=...,
devices=...)` builds a whole model from a config, its layer form (`dw_method`) chosen for the
devices it runs on; `registry.make_rngs(seed)` gives fast-compiling Rngs.

Functional use (jit a function of state): split with `nnx.split(model, nnx.Param, ...)` and
rebuild inside the traced function with `nnx.merge(graphdef, params, rest, copy=True)`; without
`copy=True` a drop-path RNG counter created outside `jax.grad` cannot be advanced inside it.
"""
from cspine_jax.models.registry import make_encoder, make_model, make_rngs  # noqa: E402,F401
