"""timm -> Flax NNX weight conversion for the image encoders (ConvNeXt, EfficientNetV2).

Two entry points:

* `load_pretrained(encoder, path)` copies pretrained weights into an existing encoder
  (`models.convnext.ConvNeXt` or `models.efficientnet_v2.EfficientNetV2`) in place. `path` is a
  timm state dict file (`.safetensors`; `.pth`/`.pt`/`.bin` need torch and are read with
  `torch.load(weights_only=True)`), or a folder written by the importer below. This is what
  `config.model.pretrained = PATH` calls right after the encoder is built; it raises
  `WeightsError` naming the file and every missing / unexpected / wrongly shaped tensor, so a
  partial load never passes silently. An encoder with `in_chans != 3` gets timm's
  `adapt_input_conv` of the RGB stem (1 channel: sum over RGB; C > 3: RGB repeated ceil(C/3)
  times, cut to C, times 3/C).
* `python -m cspine_jax.weights import --source PATH --model convnext_tiny --out DIR` converts a
  timm file once and saves the Flax parameters and BatchNorm statistics with orbax in
  `DIR/params` plus `DIR/encoder.json` (model name, variant, in_chans, source, shapes).

ImageNet weights by their timm tag (`"timm:convnext_tiny.fb_in22k_ft_in1k"` as
`config.model.pretrained`): `python -m cspine_jax.weights fetch TAG` downloads the Hugging Face
hub file `timm/TAG` / `model.safetensors` (`fetch_timm`; with `HF_HUB_OFFLINE=1` it takes the
file from the local Hugging Face cache, `HF_HOME` / `HF_HUB_CACHE`) and converts it into
`weights_cache_dir()/TAG` (`CSPINE_JAX_WEIGHTS`, default `~/.cache/cspine_jax/weights`).
Building a model only looks (`resolve_timm`): the converted folder, else the file in the Hugging
Face cache; nothing is downloaded during training, and weights found nowhere raise a WeightsError
that names the fetch command.

Model names are `<family>_<variant>`: `convnext_{atto,femto,pico,nano,tiny,small,test}`,
`efficientnet_v2_{s,tf_s,test,tf_test}`. timm's `tf_efficientnetv2_s.*` weights need
`efficientnet_v2_tf_s` (TF "SAME" padding, BN eps 1e-3); `efficientnetv2_s` ones need
`efficientnet_v2_s`.

Each family has ONE mapping table (`CONVNEXT_RULES`, `EFFNET_RULES`): a full-match regex over the
cleaned timm key, the Flax parameter path it becomes, and the layout change ("conv": torch
(O, I, kh, kw) -> Flax (kh, kw, I, O), which also maps depthwise (C, 1, kh, kw) to
`layers.DepthwiseConv2d`'s (kh, kw, 1, C); "linear": torch (out, in) -> (in, out), also for
timm's conv_mlp 1x1 convs (out, in, 1, 1); "copy"). Norm leaves map weight/bias/running_mean/
running_var -> scale/bias/mean/var. Classifier heads and `num_batches_tracked` are dropped.
Wrapper dicts (`state_dict`, `model`, `module`, `state_dict_ema`) and key prefixes (`module.`,
`model.`, `_orig_mod.`) are stripped first.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, Sequence

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from safetensors import numpy as safetensors_np

from cspine_jax.io import files
from cspine_jax.models import convnext, efficientnet_v2

FORMAT = "cspine_jax.weights/1"
META_FILE = "encoder.json"
PARAMS_DIR = "params"
_WRAPPERS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_NORM_LEAF = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_MAX_LISTED = 25


# config.model.pretrained = TIMM_SCHEME + a timm tag: ImageNet weights from the caches below.
TIMM_SCHEME = "timm:"
HUB_ORG = "timm"
HUB_FILE = "model.safetensors"
CACHE_ENV = "CSPINE_JAX_WEIGHTS"  # where fetched weights are kept converted
# ImageNet weights (timm tags) the seed method's full-size encoders start from.
SEED_TAGS = {"convnext_tiny": "convnext_tiny.fb_in22k_ft_in1k",
             "efficientnet_v2_tf_s": "tf_efficientnetv2_s.in21k_ft_in1k"}
# Encoder sizes made for tests only; every other size starts from ImageNet weights at full scale.
TEST_VARIANTS = ("test", "tf_test")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)?")
# timm architecture prefix -> this project's model-name prefix (variant follows both).
_TIMM_ARCHS = (("tf_efficientnetv2_", "efficientnet_v2_tf_"),
               ("efficientnetv2_", "efficientnet_v2_"), ("convnext_", "convnext_"))


class WeightsError(ValueError):
  """A weights file cannot be read or does not fit the encoder."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """timm key regex -> Flax path template (named groups; `{norm}` is a renamed norm leaf).

  `target` None drops the tensor (classifier head, counters).
  """
  pattern: str
  target: str | None
  layout: str = "copy"  # "conv" | "linear" | "copy"


_CNB = r"stages\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\."
_CNT = "stages.{i}.blocks.{j}."
CONVNEXT_RULES: tuple[Rule, ...] = (
    Rule(r"stem\.0\.weight", "stem_conv.kernel", "conv"),
    Rule(r"stem\.0\.bias", "stem_conv.bias"),
    Rule(r"stem\.1\.(?P<norm>weight|bias)", "stem_norm.{norm}"),
    Rule(r"stages\.(?P<i>\d+)\.downsample\.0\.(?P<norm>weight|bias)",
         "stages.{i}.downsample_norm.{norm}"),
    Rule(r"stages\.(?P<i>\d+)\.downsample\.1\.weight", "stages.{i}.downsample_conv.kernel", "conv"),
    Rule(r"stages\.(?P<i>\d+)\.downsample\.1\.bias", "stages.{i}.downsample_conv.bias"),
    Rule(_CNB + r"conv_dw\.weight", _CNT + "conv_dw.kernel", "conv"),
    Rule(_CNB + r"conv_dw\.bias", _CNT + "conv_dw.bias"),
    Rule(_CNB + r"norm\.(?P<norm>weight|bias)", _CNT + "norm.{norm}"),
    Rule(_CNB + r"mlp\.fc(?P<k>[12])\.weight", _CNT + "mlp_fc{k}.kernel", "linear"),
    Rule(_CNB + r"mlp\.fc(?P<k>[12])\.bias", _CNT + "mlp_fc{k}.bias"),
    Rule(_CNB + r"gamma", _CNT + "gamma"),
    Rule(r"head\.norm\.(?P<norm>weight|bias)", "head_norm.{norm}"),
    Rule(r"head\.fc\.(weight|bias)", None),
)

_EBN = r"(?P<m>bn[12]|blocks\.\d+\.\d+\.bn[123])\."
EFFNET_RULES: tuple[Rule, ...] = (
    Rule(r"(?P<m>conv_stem|conv_head|blocks\.\d+\.\d+\.(?:conv|conv_exp|conv_pw|conv_dw|conv_pwl"
         r"|se\.conv_reduce|se\.conv_expand))\.weight", "{m}.kernel", "conv"),
    Rule(r"(?P<m>blocks\.\d+\.\d+\.se\.conv_(?:reduce|expand))\.bias", "{m}.bias"),
    Rule(_EBN + r"(?P<norm>weight|bias|running_mean|running_var)", "{m}.{norm}"),
    Rule(_EBN + r"num_batches_tracked", None),
    Rule(r"classifier\.(weight|bias)", None),
)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  encoder_cls: type
  variants: dict[str, Any]
  rules: tuple[Rule, ...]
  stem_kernel: str  # Flax path of the input conv kernel (adapted for in_chans != 3)


FAMILIES: dict[str, Family] = {
    "convnext": Family("convnext", convnext.ConvNeXt, convnext.VARIANTS, CONVNEXT_RULES,
                       "stem_conv.kernel"),
    "efficientnet_v2": Family("efficientnet_v2", efficientnet_v2.EfficientNetV2,
                              efficientnet_v2.VARIANTS, EFFNET_RULES, "conv_stem.kernel"),
}

# Flax path -> (array in Flax layout, where it came from: timm key or "<dir>:<path>").
Converted = dict[str, tuple[np.ndarray, str]]


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_pretrained` did: tensors copied, whether the stem was adapted, the source."""
  source: str
  family: str
  num_tensors: int
  stem_adapted_from: int | None
  fold: int | None = None  # the fold of the training run the weights came from, if one


def family_of(encoder: nnx.Module) -> Family:
  for fam in FAMILIES.values():
    if isinstance(encoder, fam.encoder_cls):
      return fam
  raise WeightsError(f"no timm weight mapping for {type(encoder).__name__}; "
                     f"known encoders: {[f.encoder_cls.__name__ for f in FAMILIES.values()]}")


def parse_model_name(name: str) -> tuple[Family, str]:
  """'convnext_tiny' -> (convnext family, 'tiny'); 'efficientnet_v2_tf_s' -> (..., 'tf_s')."""
  for fam in sorted(FAMILIES.values(), key=lambda f: -len(f.name)):
    if name.startswith(fam.name + "_"):
      variant = name[len(fam.name) + 1:]
      if variant not in fam.variants:
        raise WeightsError(f"unknown {fam.name} variant {variant!r} in model name {name!r}; "
                           f"known: {sorted(fam.variants)}")
      return fam, variant
  raise WeightsError(f"unknown model name {name!r}; expected one of "
                     f"{[f.name + '_<variant>' for f in FAMILIES.values()]}")


def is_test_size(name: str) -> bool:
  """Whether encoder ``name`` is one of the small test sizes (random init is their normal start)."""
  return parse_model_name(name)[1] in TEST_VARIANTS


def build_encoder(name: str, *, in_chans: int = 3, abstract: bool = False,
                  rngs: nnx.Rngs | None = None, **kwargs: Any) -> nnx.Module:
  """Builds the encoder named like `parse_model_name` expects.

  `abstract=True` builds it under `nnx.eval_shape` (shapes only, no random init, which costs
  tens of seconds of per-shape compiles on CPU); `load_pretrained` then fills every variable.
  """
  fam, variant = parse_model_name(name)
  make = lambda: fam.encoder_cls(variant, in_chans=in_chans, rngs=rngs or nnx.Rngs(0), **kwargs)
  return nnx.eval_shape(make) if abstract else make()


# ----------------------------------------------------------------------------- reading timm files
def clean_state_dict(sd: dict[str, Any], source: str = "<dict>") -> dict[str, np.ndarray]:
  """Unwraps checkpoint wrappers, strips 'module.'/'model.' prefixes, converts to numpy."""
  while len(sd) >= 1 and all(not _is_array(v) for v in sd.values()):
    inner = [k for k in _WRAPPERS if isinstance(sd.get(k), dict)]
    if not inner:
      raise WeightsError(f"{source}: no tensors found; top-level keys {sorted(sd)[:10]}")
    sd = sd[inner[0]]
  out: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    if not _is_array(value):
      continue  # e.g. an epoch counter next to the tensors
    clean = key
    stripped = True
    while stripped:
      stripped = False
      for p in _PREFIXES:
        if clean.startswith(p):
          clean, stripped = clean[len(p):], True
    if clean in out:
      raise WeightsError(f"{source}: key {key!r} collides with another after prefix stripping")
    out[clean] = _to_numpy(value)
  return out


def _is_array(v: Any) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


def _to_numpy(v: Any) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v
  if type(v).__module__.startswith("torch"):
    return v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
  return np.asarray(v)


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a timm state dict file into {clean key: numpy array} (no pickle without torch)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: weights file not found")
  if path.suffix == ".safetensors":
    try:
      raw = safetensors_np.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
      raise WeightsError(f"{path}: cannot read safetensors file: {e}") from e
  elif path.suffix in (".pth", ".pt", ".bin"):
    try:
      import torch  # lazy: optional; only .pth/.pt/.bin files need it
    except ImportError as e:
      raise WeightsError(f"{path}: reading a PyTorch {path.suffix} file needs torch, which is not "
                         "installed; convert it to .safetensors or install torch") from e
    try:
      raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
      raise WeightsError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
    if not isinstance(raw, dict):
      raise WeightsError(f"{path}: expected a state dict, got {type(raw).__name__}")
  else:
    raise WeightsError(f"{path}: unsupported weights file type {path.suffix!r}; expected "
                       ".safetensors, .pth, .pt or .bin, or an imported folder")
  return clean_state_dict(raw, str(path))


# ------------------------------------------------------------------------------- mapping
def _to_flax_layout(arr: np.ndarray, layout: str, key: str) -> np.ndarray:
  if layout == "conv":
    if arr.ndim != 4:
      raise WeightsError(f"{key}: conv weight should be 4-D (O, I, kh, kw); got {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
  if layout == "linear":
    if arr.ndim == 4 and arr.shape[2:] == (1, 1):  # timm conv_mlp: 1x1 conv == linear
      arr = arr[:, :, 0, 0]
    if arr.ndim != 2:
      raise WeightsError(f"{key}: linear weight should be (out, in); got {arr.shape}")
    return np.ascontiguousarray(arr.T)
  return arr


def convert_timm(state_dict: dict[str, np.ndarray],
                 family: Family) -> tuple[Converted, list[str]]:
  """Maps clean timm keys to Flax paths; returns (converted, timm keys no rule matched)."""
  converted: Converted = {}
  unmatched = []
  compiled = [(re.compile(r.pattern), r) for r in family.rules]
  for key, arr in state_dict.items():
    for regex, rule in compiled:
      m = regex.fullmatch(key)
      if m:
        break
    else:
      unmatched.append(key)
      continue
    if rule.target is None:
      continue
    fields = m.groupdict()
    if "norm" in fields:
      fields["norm"] = _NORM_LEAF[fields["norm"]]
    converted[rule.target.format(**fields)] = (_to_flax_layout(arr, rule.layout, key), key)
  return converted, unmatched


def adapt_stem_kernel(kernel: np.ndarray, in_chans: int) -> np.ndarray:
  """timm's adapt_input_conv on a Flax (kh, kw, I, O) kernel pretrained with I = 3 channels."""
  base = kernel.shape[2]
  if in_chans == base:
    return kernel
  if in_chans < 1:
    raise WeightsError(f"in_chans must be positive; got {in_chans}")
  k = kernel.astype(np.float32)
  if in_chans == 1:
    out = k.sum(axis=2, keepdims=True)
  else:
    if base != 3:
      raise WeightsError(f"cannot adapt a {base}-channel stem kernel to {in_chans} channels "
                         "(timm only adapts 3-channel ones)")
    reps = int(math.ceil(in_chans / base))
    out = np.tile(k, (1, 1, reps, 1))[:, :, :in_chans, :] * (base / float(in_chans))
  return out.astype(kernel.dtype)


def _variables(encoder: nnx.Module) -> dict[str, nnx.Variable]:
  state = nnx.state(encoder, (nnx.Param, nnx.BatchStat))
  return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def encoder_arrays(encoder: nnx.Module) -> dict[str, np.ndarray]:
  """{Flax path: numpy array} of every parameter and BatchNorm statistic of `encoder`."""
  return {k: np.asarray(v.get_value()) for k, v in _variables(encoder).items()}


def _listing(title: str, items: Sequence[str]) -> str:
  shown = list(items)[:_MAX_LISTED]
  more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"{len(items)} {title}: {', '.join(shown)}{more}"


def assign(encoder: nnx.Module, converted: Converted, source: str, *,
           unmatched: Sequence[str] = ()) -> LoadReport:
  """Checks that `converted` covers exactly the encoder's variables, then copies them in.

  Raises WeightsError naming every unmatched / unexpected / missing / misshaped tensor; nothing
  is copied unless everything fits.
  """
  fam = family_of(encoder)
  variables = _variables(encoder)
  unexpected = [f"{src} (-> {path})" for path, (_, src) in converted.items()
                if path not in variables]
  missing = [p for p in variables if p not in converted]
  stem_from = None
  bad_shapes = []
  values = {}
  for path, var in variables.items():
    if path not in converted:
      continue
    arr, src = converted[path]
    want = tuple(var.get_value().shape)
    if path == fam.stem_kernel and arr.ndim == 4 and arr.shape[2] != want[2]:
      stem_from = arr.shape[2]
      try:
        arr = adapt_stem_kernel(arr, want[2])
      except WeightsError as e:
        bad_shapes.append(f"{src} (-> {path}): {e}")
        continue
    if tuple(arr.shape) != want:
      bad_shapes.append(f"{src} (-> {path}): file {tuple(arr.shape)} vs encoder {want}")
      continue
    values[path] = arr
  problems = []
  if unmatched:
    problems.append(_listing(f"unexpected keys (no {fam.name} rule)", list(unmatched)))
  if unexpected:
    problems.append(_listing("unexpected keys (not in this encoder)", unexpected))
  if missing:
    problems.append(_listing("missing keys (encoder variables the file lacks)", missing))
  if bad_shapes:
    problems.append(_listing("shape mismatches", bad_shapes))
  if problems:
    name = f"{fam.name} {getattr(encoder, 'variant', '')}".strip()
    raise WeightsError(f"{source}: weights do not fit the {name} encoder:\n  "
                       + "\n  ".join(problems))
  state = nnx.state(encoder, (nnx.Param, nnx.BatchStat))
  for path, var in nnx.to_flat_state(state):
    key = ".".join(str(p) for p in path)
    var.set_value(jnp.asarray(values[key], dtype=var.get_value().dtype))
  nnx.update(encoder, state)
  return LoadReport(source=source, family=fam.name, num_tensors=len(values),
                    stem_adapted_from=stem_from)


# ------------------------------------------------------------------- converted (orbax) folders
def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def save_converted(encoder: nnx.Module, out_dir: str | pathlib.Path, *, model: str,
                   source: str = "") -> pathlib.Path:
  """Saves the encoder's parameters + BatchNorm stats with orbax, plus encoder.json."""
  out_dir = pathlib.Path(out_dir).resolve()
  params_dir = out_dir / PARAMS_DIR
  if params_dir.exists():
    raise WeightsError(f"{params_dir}: already exists; choose a new --out folder")
  out_dir.mkdir(parents=True, exist_ok=True)
  fam = family_of(encoder)
  arrays = encoder_arrays(encoder)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(params_dir, _nest(arrays))
  ckptr.wait_until_finished()  # saves are asynchronous; the folder is complete only after this
  ckptr.close()
  meta = {"format": FORMAT, "model": model, "family": fam.name,
          "variant": getattr(encoder, "variant", None), "in_chans": encoder.in_chans,
          "num_features": encoder.num_features, "source": str(source),
          "shapes": {k: list(v.shape) for k, v in arrays.items()},
          "dtypes": {k: str(v.dtype) for k, v in arrays.items()}}
  files.write_json(out_dir / META_FILE, meta)  # last: its presence marks a complete folder
  return out_dir


def read_converted(folder: str | pathlib.Path) -> tuple[dict[str, Any], Converted]:
  """Reads an importer folder: (encoder.json contents, {Flax path: (array, origin)})."""
  folder = pathlib.Path(folder).resolve()
  meta_path = folder / META_FILE
  if not meta_path.is_file():
    raise WeightsError(f"{folder}: not an imported weights folder (no {META_FILE})")
  try:
    meta = json.loads(meta_path.read_text())
  except json.JSONDecodeError as e:
    raise WeightsError(f"{meta_path}: invalid JSON: {e}") from e
  if meta.get("format") != FORMAT or not isinstance(meta.get("shapes"), dict):
    raise WeightsError(f"{meta_path}: unknown format {meta.get('format')!r}; expected {FORMAT}")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {k: jax.ShapeDtypeStruct(tuple(s), np.dtype(meta["dtypes"].get(k, "float32")),
                                    sharding=sharding)
            for k, s in meta["shapes"].items()}
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = ckptr.restore(folder / PARAMS_DIR, _nest(target))
  except Exception as e:  # orbax raises many types (missing files, shape errors)
    raise WeightsError(f"{folder / PARAMS_DIR}: cannot restore orbax checkpoint: {e}") from e
  finally:
    ckptr.close()
  flat = _flatten(restored)
  return meta, {k: (np.asarray(v), f"{folder.name}:{k}") for k, v in flat.items()}


# ------------------------------------------------------------------------------ entry points
def load_pretrained(encoder: nnx.Module, path: str | pathlib.Path) -> LoadReport:
  """Loads timm weights (a file, or ``"timm:<tag>"``: `load_timm`) or imported weights (a folder
  of `save_converted`) into `encoder` in place (a training run folder is ``train.warm_start``'s).

  For `config.model.pretrained`: call right after building the encoder and before creating the
  optimizer. Every parameter and BatchNorm statistic is replaced, so the encoder may also be an
  abstract one from `nnx.eval_shape` (skips the random init). Raises WeightsError (a
  ValueError) naming the file and every mismatch; on error the encoder is left unchanged.
  """
  if isinstance(path, str) and path.startswith(TIMM_SCHEME):
    return load_timm(encoder, path[len(TIMM_SCHEME):])
  path = pathlib.Path(path)
  fam = family_of(encoder)
  if path.is_dir():
    meta, converted = read_converted(path)
    if meta.get("family") != fam.name:
      raise WeightsError(f"{path}: holds {meta.get('family')} weights ({meta.get('model')}); "
                         f"the encoder is {fam.name}")
    return assign(encoder, converted, str(path))
  converted, unmatched = convert_timm(read_state_dict(path), fam)
  return assign(encoder, converted, str(path), unmatched=unmatched)


def import_timm(source: str | pathlib.Path, model: str, out_dir: str | pathlib.Path, *,
                in_chans: int = 3) -> tuple[pathlib.Path, LoadReport]:
  """Converts a timm weights file for `model` and saves it (see module docstring)."""
  encoder = build_encoder(model, in_chans=in_chans, abstract=True)
  report = load_pretrained(encoder, source)
  return save_converted(encoder, out_dir, model=model, source=str(source)), report



# ------------------------------------------------------------------ timm tags (Hugging Face hub)
def check_tag(tag: str) -> str:
  """A timm tag ``<architecture>[.<weights>]`` as the hub names repositories, or WeightsError."""
  if not _TAG_RE.fullmatch(tag):
    raise WeightsError(f"{tag!r} is not a timm tag such as 'convnext_tiny.fb_in22k_ft_in1k'")
  return tag


def timm_model_name(tag: str) -> str:
  """The encoder a timm tag's weights are for: 'convnext_tiny.fb_in22k_ft_in1k' ->
  'convnext_tiny', 'tf_efficientnetv2_s.in21k_ft_in1k' -> 'efficientnet_v2_tf_s' (TF "SAME"
  padding), 'efficientnetv2_s' -> 'efficientnet_v2_s'."""
  arch = check_tag(tag).partition(".")[0]
  for timm_prefix, prefix in _TIMM_ARCHS:
    if arch.startswith(timm_prefix):
      name = prefix + arch[len(timm_prefix):]
      try:
        parse_model_name(name)
      except WeightsError as e:
        raise WeightsError(f"timm architecture {arch!r} (tag {tag!r}): {e}") from None
      return name
  raise WeightsError(f"timm architecture {arch!r} (tag {tag!r}) has no encoder here; known: "
                     f"{', '.join(p + '<variant>' for p, _ in _TIMM_ARCHS)}")


def hub_cache_dir() -> pathlib.Path:
  """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's
  default (read at each call, so a process may set them after import)."""
  if os.environ.get("HF_HUB_CACHE"):
    return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
  if os.environ.get("HF_HOME"):
    return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
  return pathlib.Path(hf_constants.HF_HUB_CACHE)


def weights_cache_dir() -> pathlib.Path:
  """Where fetched weights are kept converted: ``CSPINE_JAX_WEIGHTS``, else
  ``$XDG_CACHE_HOME/cspine_jax/weights`` (``~/.cache/...``)."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return pathlib.Path(cache).expanduser() / "cspine_jax" / "weights"


def converted_dir(tag: str) -> pathlib.Path:
  """The converted (imported) folder of a fetched tag."""
  return weights_cache_dir() / check_tag(tag)


def hub_repo(tag: str) -> str:
  return f"{HUB_ORG}/{check_tag(tag)}"


def cached_hub_file(tag: str) -> pathlib.Path | None:
  """The tag's ``model.safetensors`` in the Hugging Face cache, or None; never downloads."""
  found = huggingface_hub.try_to_load_from_cache(hub_repo(tag), HUB_FILE,
                                                 cache_dir=hub_cache_dir())
  return pathlib.Path(found) if isinstance(found, str) else None


def fetch_command(tag: str) -> str:
  return f"python -m cspine_jax.weights fetch {tag}"


def resolve_timm(tag: str) -> pathlib.Path:
  """The local weights of a timm tag: its converted folder, else the hub file in the Hugging Face
  cache. Never downloads; WeightsError naming the fetch command when neither is there."""
  converted = converted_dir(tag)
  if (converted / META_FILE).is_file():
    return converted
  found = cached_hub_file(tag)
  if found is not None:
    return found
  raise WeightsError(
      f"{TIMM_SCHEME}{tag}: the weights are not on this machine (no {converted}, no "
      f"{hub_repo(tag)}/{HUB_FILE} in the Hugging Face cache {hub_cache_dir()}); run "
      f"`{fetch_command(tag)}` first (online, or offline with HF_HUB_OFFLINE=1 and the file in "
      "the Hugging Face cache), or set model.pretrained='none' for a random start")


def load_timm(encoder: nnx.Module, tag: str) -> LoadReport:
  """``config.model.pretrained = "timm:<tag>"``: the tag's weights (`resolve_timm`) into
  `encoder`, which must be the encoder they are for (`timm_model_name`)."""
  name = timm_model_name(tag)
  fam, variant = parse_model_name(name)
  have = family_of(encoder)
  if (have.name, getattr(encoder, "variant", None)) != (fam.name, variant):
    raise WeightsError(f"{TIMM_SCHEME}{tag}: holds {name} weights; the encoder is "
                       f"{have.name}_{getattr(encoder, 'variant', '?')} (model.encoder must be "
                       f"{name!r})")
  path = resolve_timm(tag)
  if path.is_dir():
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("model") != name:
      raise WeightsError(f"{path}: holds {meta.get('model')} weights, not {name} ({TIMM_SCHEME}"
                         f"{tag}); delete it and run `{fetch_command(tag)}` again")
  return load_pretrained(encoder, path)


def download_hub_file(tag: str) -> pathlib.Path:
  """The tag's ``model.safetensors`` through huggingface_hub: downloaded into the Hugging Face
  cache when online, taken from it when ``HF_HUB_OFFLINE=1``; WeightsError when it cannot be had."""
  repo, cache = hub_repo(tag), hub_cache_dir()
  try:
    return pathlib.Path(huggingface_hub.hf_hub_download(repo, HUB_FILE, cache_dir=cache,
                                                        library_name="cspine_jax"))
  except hf_errors.LocalEntryNotFoundError as e:
    raise WeightsError(f"{repo}/{HUB_FILE}: not in the Hugging Face cache {cache} and it cannot "
                       f"be downloaded (offline: HF_HUB_OFFLINE=1, or no network): {e}") from e
  except (hf_errors.RepositoryNotFoundError,
          hf_errors.EntryNotFoundError) as e:
    raise WeightsError(f"{repo}/{HUB_FILE}: not on the Hugging Face hub (is {tag!r} a timm tag "
                       f"with safetensors weights?): {e}") from e
  except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
    raise WeightsError(f"{repo}/{HUB_FILE}: download failed: {e}") from e


@dataclasses.dataclass(frozen=True)
class Fetched:
  """What `fetch_timm` did: the converted folder, the hub file, whether it converted it now."""
  folder: pathlib.Path
  hub_file: pathlib.Path
  model: str
  converted: bool
  num_tensors: int


def fetch_timm(tag: str, *, model: str | None = None,
               out: str | pathlib.Path | None = None) -> Fetched:
  """Downloads (or, offline, finds in the Hugging Face cache) a timm tag's weights and converts
  them for ``model`` (default: the tag's encoder) into ``out`` (default `converted_dir`). A folder
  already converted for the same model is kept."""
  name = model or timm_model_name(tag)
  folder = pathlib.Path(out) if out is not None else converted_dir(tag)
  hub_file = download_hub_file(tag)
  if (folder / META_FILE).is_file():
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("model") != name:
      raise WeightsError(f"{folder}: already holds {meta.get('model')} weights; converting "
                         f"{tag} for {name} needs another --out (or delete it)")
    return Fetched(folder.resolve(), hub_file, name, False, len(meta.get("shapes", {})))
  folder, report = import_timm(hub_file, name, folder)
  return Fetched(folder, hub_file, name, True, report.num_tensors)
