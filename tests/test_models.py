"""Model shapes, parameter counts and names, train/eval behaviour, dtypes, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cspine_jax.models import cnn3d, convnext, layers, registry, sequence, slice2d, stage1
from cspine_jax.models.cpu import native


def _images(shape, seed=0):
  return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def _encoder(**kw):
  kw.setdefault("dw_method", "shifted")  # what the suite's 8 CPU devices choose
  return convnext.ConvNeXt("test", rngs=registry.make_rngs(0), **kw)


def _apply(model, *args, abstract=False, **kw):
  """Runs the model under one jax.jit of its state (eager dispatch compiles per op), or only
  traces it (`abstract=True`: shapes and dtypes without compiling)."""
  graphdef, state = nnx.split(model)
  fn = lambda s, *a: nnx.merge(graphdef, s, copy=True)(*a, **kw)  # noqa: E731
  return jax.eval_shape(fn, state, *args) if abstract else jax.jit(fn)(state, *args)


def _param_count(model) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _convnext_formula(depths, dims, in_chans=3) -> int:
  """Parameter count of timm's convnext_* without the classifier fc, from the paper's layout."""
  total = in_chans * 16 * dims[0] + dims[0] + 2 * dims[0]  # stem conv + LN
  for i, (d, c) in enumerate(zip(depths, dims)):
    if i > 0:
      total += 2 * dims[i - 1] + 4 * dims[i - 1] * c + c  # LN + 2x2 conv
    total += d * (49 * c + c + 2 * c + 4 * c * c + 4 * c + 4 * c * c + c + c)
  return total + 2 * dims[-1]  # head norm


@pytest.mark.parametrize("variant", ["atto", "tiny"])
def test_convnext_param_counts(variant):
  model = nnx.eval_shape(lambda: convnext.ConvNeXt(variant, rngs=nnx.Rngs(0)))
  count = _param_count(model)
  assert count == _convnext_formula(*convnext.VARIANTS[variant])
  if variant == "tiny":
    # timm convnext_tiny has 28,589,128 parameters; its 768->1000 fc has 769,000.
    assert count == 28_589_128 - 769_000
  else:
    assert 3.3e6 < count < 3.5e6


def test_convnext_timm_names_and_shapes():
  model = _encoder()
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name in ["stem_conv.kernel", "stem_norm.scale", "head_norm.bias",
               "stages.1.downsample_norm.scale", "stages.1.downsample_conv.kernel",
               "stages.0.blocks.0.conv_dw.kernel", "stages.0.blocks.0.norm.scale",
               "stages.3.blocks.0.mlp_fc1.kernel", "stages.3.blocks.0.mlp_fc2.bias",
               "stages.2.blocks.0.gamma"]:
    assert name in paths, name
  assert not any(p.startswith("stages.0.downsample") for p in paths)
  assert model.stages[1].downsample_conv.kernel.shape == (2, 2, 8, 16)
  assert model.stages[0].blocks[0].conv_dw.kernel.shape == (7, 7, 1, 8)
  np.testing.assert_allclose(model.stages[0].blocks[0].gamma[...], 1e-6)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  feats = _apply(model, x, abstract=True)
  fmap = jax.eval_shape(lambda x: model.forward_features(x), x)
  assert feats.shape == (2, 64) and feats.dtype == jnp.float32
  assert fmap.shape == (2, 2, 2, 64)
  with pytest.raises(ValueError, match="unknown ConvNeXt variant"):
    convnext.ConvNeXt("huge", rngs=nnx.Rngs(0))


def test_drop_path_only_in_train_mode():
  drop = layers.DropPath(0.5, rngs=registry.make_rngs(1))
  x = jnp.ones((64, 3))

  def run(module):
    # The graphdef holds the train/eval flag, so it is closed over per call, not cached.
    graphdef, state = nnx.split(module)

    def twice(s):
      m = nnx.merge(graphdef, s, copy=True)
      return m(x), m(x)
    return jax.jit(twice)(state)

  a, b = run(drop)
  kept = np.asarray(a[:, 0])
  assert set(np.unique(kept)) <= {0.0, 2.0} and 0 < kept.sum() < 128  # kept ones rescaled
  assert np.all(a == a[:, :1])  # whole samples dropped
  assert not np.array_equal(a, b)  # a fresh mask per call
  drop.eval()
  a, b = run(drop)
  np.testing.assert_array_equal(a, x)
  np.testing.assert_array_equal(b, x)
  # The encoder's blocks follow model.train() / model.eval(); rates rise linearly as in timm.
  model = _encoder(drop_path_rate=0.3)
  paths = [blk.drop_path for st in model.stages for blk in st.blocks]
  np.testing.assert_allclose([p.rate for p in paths], [0.0, 0.1, 0.2, 0.3])
  assert not any(p.deterministic for p in paths)
  model.eval()
  assert all(p.deterministic for p in paths)
  model.train()
  assert not any(p.deterministic for p in paths)
  with pytest.raises(ValueError, match="drop path rate"):
    layers.DropPath(1.0)


@pytest.mark.parametrize("drop_path_rate,train,method", [(0.0, True, "shifted"),
                                                         (0.3, True, "shifted"),
                                                         (0.3, False, "shifted"),
                                                         (0.3, True, "native"),
                                                         (0.3, False, "native")])
def test_convnext_cpu_form_matches_library_form(drop_path_rate, train, method):
  """dw_method "shifted" / "native" (the CPU forms: conv bias inside the tap sum; in training LayerNorm affine
  folded into fc1 and the downsample conv, layer scale into fc2; custom VJPs) against "lax" (the
  library modules) on the same parameters: pooled features and every parameter's gradient, in
  train mode (same drop-path draws) and in eval mode (no folds)."""
  if method == "native":
    assert native.load_once(), "the native kernels should build here (g++ is on every machine kind)"
  models = [_encoder(dw_method=m, drop_path_rate=drop_path_rate) for m in (method, "lax")]
  for m in models:
    if not train:
      m.eval()
  params = nnx.state(models[0], nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  rs = np.random.RandomState(6)  # away from the init (unit scales, zero shifts, gamma 1e-6)
  params = jax.tree.unflatten(treedef, [p + 0.3 * rs.standard_normal(p.shape).astype(np.float32)
                                        for p in leaves])
  for m in models:
    nnx.update(m, params)
  x = _images((3, 32, 32, 3))

  @nnx.jit
  def run(m, x):
    def loss(m):
      return jnp.sum(jnp.sin(m(x)))
    return m(x), nnx.grad(loss)(m)

  (y, g), (y_ref, g_ref) = run(models[0], x), run(models[1], x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
  flat, flat_ref = jax.tree.leaves(nnx.state(g, nnx.Param)), jax.tree.leaves(nnx.state(g_ref, nnx.Param))
  assert len(flat) == len(flat_ref)
  for a, b in zip(flat, flat_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  if method == "native" and not train:  # the same bits every call (train mode draws new drop paths)
    for _ in range(5):
      y2, g2 = run(models[0], x)
      np.testing.assert_array_equal(y2, y)
      for a, b in zip(jax.tree.leaves(nnx.state(g2, nnx.Param)), flat):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_close_to_float32():
  f32 = _encoder()
  bf16 = _encoder(dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  for m in (f32, bf16):
    m.eval()
    for stage in m.stages:  # make the blocks matter for the comparison
      for block in stage.blocks:
        block.gamma[...] = jnp.full_like(block.gamma[...], 0.5)
  x = _images((2, 32, 32, 3))
  y32, y16 = _apply(f32, x), _apply(bf16, x)
  assert y16.dtype == jnp.float32 and np.all(np.isfinite(y16))
  assert bf16.stages[0].blocks[0].mlp_fc1.kernel[...].dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, atol=0.15)
  assert np.corrcoef(np.ravel(y16), np.ravel(y32))[0, 1] > 0.99


def test_stage2_shapes_attention_and_gradients():
  rngs = registry.make_rngs(0)
  model = sequence.Stage2Model(_encoder(drop_path_rate=0.1), lstm_hidden=12, lstm_layers=2,
                               rngs=rngs)
  assert model.lstm[0].forward_lstm.dense_h.kernel.shape == (12, 48)
  images = _images((3, 4, 32, 32, 3))  # a short sequence keeps the unrolled LSTM small
  labels = np.array([1.0, 0.0, 1.0], np.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(params, rest, images):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest, copy=True)
      logits, weights = m(images, return_attention=True)
      loss = jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)  # BCE with logits
      return loss, (logits, weights)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (logits, weights)), grads = run(params, rest, images)
  assert logits.shape == (3,) and weights.shape == (3, 4) and np.isfinite(loss)
  np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, rtol=1e-5)
  assert np.all(weights >= 0)
  for path, g in nnx.to_flat_state(grads):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)) and np.any(g != 0), ".".join(map(str, path))


def test_attention_pool_mask():
  pool = layers.AttentionPool(4, 3, rngs=registry.make_rngs(0))
  x = _images((2, 5, 4))
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  pooled, w = jax.jit(lambda s, x, m: nnx.merge(*s)(x, m))(nnx.split(pool), x, mask)
  np.testing.assert_allclose(np.sum(w, axis=1), 1.0, rtol=1e-6)
  assert np.all(w[0, 2:] == 0)
  np.testing.assert_allclose(pooled[0], np.einsum("t,tf->f", w[0, :2], x[0, :2]), rtol=1e-5)


def test_registry_builds_every_model_with_right_outputs():
  base = {"encoder": "convnext_test", "drop_path_rate": 0.1}
  x = _images((2, 32, 32, 3))
  m = registry.make_model({**base, "name": "stage2", "vertebra_embedding": 4},
                          rngs=registry.make_rngs(0), devices=jax.devices())
  assert isinstance(m, sequence.Stage2Model) and m.lstm[0].forward_lstm.hidden == 64
  m.eval()
  out = _apply(m, _images((2, 8, 32, 32, 3)), np.array([0, 6]), abstract=True)
  assert out.shape == (2,) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="vertebra"):
    m(_images((1, 8, 32, 32, 3)))

  m = registry.make_model({**base, "name": "stage1"}, rngs=registry.make_rngs(0),
                          devices=jax.devices())
  assert isinstance(m, stage1.Stage1Model)
  m.eval()
  out = _apply(m, x)
  assert out["presence"].shape == (2, 7) and out["area"].shape == (2, 7)
  assert out["box"].shape == (2, 4)
  assert np.all((out["box"] > 0) & (out["box"] < 1)) and np.all(out["area"] > 0)

  for name, heads in [("single_head", "single"), ("multi_head", "multi")]:
    m = registry.make_model({**base, "name": name, "head_hidden": 16 if heads == "multi" else 0},
                            rngs=registry.make_rngs(0), devices=jax.devices())
    assert isinstance(m, slice2d.SliceClassifier) and m.heads == heads
    m.eval()
    out = _apply(m, x, abstract=True)
    assert out["fracture"].shape == (2, 7) and out["vertebra"].shape == (2, 7)

  m = registry.make_model({"name": "cnn3d", "channels": (4, 8, 8), "hidden": (16,)},
                          rngs=registry.make_rngs(0))
  assert isinstance(m, cnn3d.CNN3D)
  vol = _images((2, 16, 16, 16, 1))
  out = _apply(m, vol)  # train mode: BatchNorm uses batch statistics
  assert out.shape == (2, cnn3d.NUM_TARGETS) and np.all(np.isfinite(out))
  m.eval()
  assert _apply(m, vol, abstract=True).shape == (2, 8)

  with pytest.raises(ValueError, match="unknown model name"):
    registry.make_model({"name": "unet"}, rngs=registry.make_rngs(0))
  with pytest.raises(ValueError, match="unknown encoder"):
    registry.make_encoder("resnet50", rngs=registry.make_rngs(0))


def test_registry_chooses_the_layer_form_for_the_models_devices(monkeypatch):
  """dw_method "auto" becomes the form for the devices the model runs on, for either encoder
  family; a named form is kept; encoders take only named forms."""
  build = lambda cfg, devices=None: nnx.eval_shape(  # noqa: E731
      lambda: registry.make_model(cfg, rngs=nnx.Rngs(0), devices=devices))
  for encoder in ("convnext_test", "efficientnet_v2_test"):
    cfg = {"name": "stage1", "encoder": encoder}
    for loaded, devices, want in [(True, jax.devices(), "shifted"),
                                  (True, jax.devices()[:1], "native"),
                                  (True, None, "native"),  # default: the first device
                                  (False, jax.devices()[:1], "shifted")]:
      monkeypatch.setattr(native, "loaded", lambda v=loaded: v)
      m = build(cfg, devices)
      dw = m.encoder.stages[0].blocks[0].conv_dw if encoder.startswith("convnext") else (
          m.encoder.blocks[3][0].conv_dw)
      assert dw.method == want, (encoder, loaded, len(devices or []))
    assert build({**cfg, "dw_method": "lax"}, jax.devices()[:1]).encoder.dw_method == "lax"
  with pytest.raises(ValueError, match="chosen by registry.make_model"):
    convnext.ConvNeXt("test", dw_method="auto", rngs=nnx.Rngs(0))


def test_seed_stage1_head_outputs_and_its_box_ratio_loss():
  from cspine_jax.train import tasks
  m = registry.make_model({"name": "stage1", "encoder": "convnext_test", "head": "ratio"},
                          rngs=registry.make_rngs(0), devices=jax.devices())
  assert isinstance(m, stage1.Stage1Model) and m.head == "ratio"
  assert not hasattr(m, "presence_head")  # no presence head: 11 outputs, box then ratios
  assert m.box_ratio_head.kernel.value.shape[-1] == 11
  m.eval()
  out = _apply(m, _images((3, 32, 32, 3)))
  assert set(out) == {"box", "ratio"} and out["box"].shape == (3, 4)
  assert out["ratio"].shape == (3, 7)
  # Raw regression: the predictions clip it to [0, 1] (as the seed's inference does).
  raw = {"box": jnp.asarray([[-0.2, 0.1, 0.5, 1.4]] * 2), "ratio": jnp.full((2, 7), 1.3)}
  pred = tasks.get("stage1").predict(raw)
  np.testing.assert_allclose(pred["box_pred"][0], [0.0, 0.1, 0.5, 1.0])
  np.testing.assert_allclose(pred["presence_prob"], 1.0)
  # The seed's loss: 0.5 x L1 of the box on images whose largest ratio exceeds 0.5
  # + 0.5 x L1 of the seven ratios; the box of a weakly shown image does not count.
  task = tasks.get("stage1", box_loss="l1", box_weight=0.5, ratio_weight=0.5)
  area = np.zeros((2, 7), np.float32)
  area[0, 2] = 0.9
  area[1, 3] = 0.4
  batch = {"area": jnp.asarray(area), "box": jnp.asarray([[0.0, 0.0, 0.5, 0.5]] * 2),
           "presence": jnp.asarray((area > 0).astype(np.float32))}
  out = {"box": jnp.asarray([[0.1, 0.0, 0.5, 0.3], [0.9, 0.9, 0.9, 0.9]]),
         "ratio": jnp.asarray(area) + 0.07}
  loss, metrics = task.loss(out, batch, jnp.ones(2))
  np.testing.assert_allclose(metrics["box_loss"], (0.1 + 0.2) / 4, rtol=1e-6)  # row 0 only
  np.testing.assert_allclose(metrics["ratio_l1"], 0.07, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * 0.075 + 0.5 * 0.07, rtol=1e-5)
  # The project's head and loss are unchanged by the new path.
  assert tasks.get("stage1").loss(
      {"presence": jnp.zeros((2, 7)), "box": batch["box"], "area": jnp.zeros((2, 7))}, batch,
      jnp.ones(2))[1].keys() >= {"presence_bce", "box_loss", "area_bce"}
  with pytest.raises(ValueError, match="head"):
    stage1.Stage1Model(_encoder(), head="boxes", rngs=registry.make_rngs(0))
