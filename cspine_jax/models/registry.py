"""Builds encoders and models by name, so configs can say `model.name="stage2"`,
`model.encoder="convnext_atto"`.

`make_model(cfg, rngs=..., devices=...)` reads a mapping-like config (ml_collections ConfigDict or
dict):

  name               "stage1" | "stage2" | "cnn3d" | "single_head" | "multi_head" | "box_refine"
  encoder            "convnext_<variant>" | "efficientnet_v2_<variant>"   (not for cnn3d)
  drop_path_rate     encoder stochastic depth (default 0.0; the seed's stage 2 uses 0.1)
  dtype              compute dtype name, "float32" (default) or "bfloat16"
  dw_method          encoder layer form: "auto" (default: `cpu.choose_method` for the devices
                     the model runs on) | "native" | "shifted" | "lax" (see `layers`)
  in_chans           encoder input channels (default 3; cnn3d default 1)
  stage2:            lstm_hidden (None = encoder width), lstm_layers (1), attention_hidden,
                     vertebra_embedding (0 = off), dropout (0.0)
  stage1:            dropout, head ("presence": presence + area + box heads; "ratio": the
                     seed's one linear layer, box and area ratios)
  box_refine:        dropout
  single/multi_head: head_hidden (multi only), dropout
  cnn3d:             channels ((32, 64, 128)), hidden ((256,)), dropout (0.3)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import box_refine, cnn3d, convnext, cpu, efficientnet_v2, sequence
from cspine_jax.models import slice2d, stage1

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ENCODER_FAMILIES = ("convnext_", "efficientnet_v2_")
MODELS = ("stage1", "stage2", "cnn3d", "single_head", "multi_head", "box_refine")


def resolve_dtype(dtype: Any) -> Any:
  """Accepts a dtype or its name ("float32", "bfloat16")."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]
  return dtype


def make_rngs(seed: int) -> nnx.Rngs:
  """Rngs with 'params' and 'dropout' streams on the "rbg" PRNG, whose random-bit programs
  compile several times faster on CPU than threefry (model construction is dominated by them)."""
  return nnx.Rngs(params=jax.random.key(seed, impl="rbg"),
                  dropout=jax.random.key(seed + 1, impl="rbg"))


def make_encoder(name: str, *, rngs: nnx.Rngs, **kw: Any) -> nnx.Module:
  """"convnext_atto" -> ConvNeXt("atto", **kw); "efficientnet_v2_s" -> EfficientNetV2("s")."""
  if "dtype" in kw:
    kw["dtype"] = resolve_dtype(kw["dtype"])
  if name.startswith("convnext_"):
    return convnext.ConvNeXt(name[len("convnext_"):], rngs=rngs, **kw)
  if name.startswith("efficientnet_v2_"):
    return efficientnet_v2.EfficientNetV2(name[len("efficientnet_v2_"):], rngs=rngs, **kw)
  raise ValueError(f"unknown encoder {name!r}; expected a name starting with {ENCODER_FAMILIES}")


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
  value = cfg.get(key, default)
  return default if value is None and default is not None else value


def dw_method(cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> str:
  """`cfg.dw_method`, with "auto" made the form for `devices` (default: the first device, where a
  jax.jit without shardings runs, as inference does)."""
  method = _get(cfg, "dw_method", "auto")
  if method != "auto":
    return method
  return cpu.choose_method(jax.devices()[:1] if devices is None else devices)


def make_model(cfg: Mapping[str, Any], *, rngs: nnx.Rngs,
               devices: Sequence[jax.Device] | None = None) -> nnx.Module:
  """Builds the model named by `cfg.name` (see the module docstring for the fields) for running
  on `devices` (a training mesh's; default: the first device), which choose its layer form."""
  name = cfg.get("name")
  if name not in MODELS:
    raise ValueError(f"unknown model name {name!r}; expected one of {MODELS}")
  dtype = resolve_dtype(_get(cfg, "dtype", "float32"))
  if name == "cnn3d":
    return cnn3d.CNN3D(in_chans=_get(cfg, "in_chans", 1),
                       channels=tuple(_get(cfg, "channels", (32, 64, 128))),
                       hidden=tuple(_get(cfg, "hidden", (256,))),
                       dropout=_get(cfg, "dropout", 0.3), dtype=dtype, rngs=rngs)
  enc_name = cfg.get("encoder")
  if not enc_name:
    raise ValueError(f"model {name!r} needs model.encoder (e.g. 'convnext_atto')")
  enc_kw = {"in_chans": _get(cfg, "in_chans", 3),
            "drop_path_rate": _get(cfg, "drop_path_rate", 0.0), "dtype": dtype,
            "dw_method": dw_method(cfg, devices)}
  encoder = make_encoder(enc_name, rngs=rngs, **enc_kw)
  dropout = _get(cfg, "dropout", 0.0)
  if name == "stage2":
    return sequence.Stage2Model(encoder, lstm_hidden=cfg.get("lstm_hidden"),
                                lstm_layers=_get(cfg, "lstm_layers", 1),
                                attention_hidden=cfg.get("attention_hidden"),
                                vertebra_embedding=_get(cfg, "vertebra_embedding", 0),
                                dropout=dropout, rngs=rngs)
  if name == "stage1":
    return stage1.Stage1Model(encoder, dropout=dropout, head=_get(cfg, "head", "presence"),
                              rngs=rngs)
  if name == "box_refine":
    return box_refine.BoxRefiner(encoder, dropout=dropout, rngs=rngs)
  heads = "single" if name == "single_head" else "multi"
  return slice2d.SliceClassifier(encoder, heads=heads, dropout=dropout,
                                 head_hidden=_get(cfg, "head_hidden", 0) if heads == "multi"
                                 else 0, rngs=rngs)
