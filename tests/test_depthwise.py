"""The CPU forms of the layers (models/cpu) match the reference ops: the shifted and native depthwise
convs lax's grouped convolution, the custom-VJP GELU jax.nn.gelu(approximate=False), the dense,
norm and patch conv VJPs autodiff (values and gradients); the form chosen for a model's devices."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cspine_jax.models import cpu, layers
from cspine_jax.models.cpu import kernel_grad, native, ops, shifted
from cspine_jax.train import steps
from cspine_jax.train import runtime


def _pair(shape, seed=0, ksize=7):
  # numpy inputs: jax.random would compile a threefry program per shape.
  rs = np.random.RandomState(seed)
  x = rs.standard_normal(shape).astype(np.float32)
  k = rs.standard_normal((ksize, ksize, 1, shape[-1])).astype(np.float32)
  return x, k, rs


def _load(method):
  """Loads the native kernels where `method` needs them (a run does it at its start)."""
  if method == "native":
    assert native.load_once(), "the native kernels should build here (g++ is on every machine kind)"


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  # rtol against the array's scale: sums of 49 products make small elements noisy in absolute.
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# (shape, kernel size, stride, padding): ConvNeXt's 7x7 "same" on odd sizes and on maps smaller
# than the kernel, plus strided 3x3 cases like EfficientNet's.
CASES = [((2, 9, 11, 5), 7, 1, 3), ((3, 2, 2, 4), 7, 1, 3), ((2, 4, 5, 6), 7, 1, 3),
         ((2, 9, 7, 3), 7, 2, 3), ((2, 8, 9, 3), 3, 2, 1), ((2, 7, 7, 3), 3, 3, 0),
         # more rows than ConvNeXt's 7x7 needs for all 49 taps, several channels, a batch of 1
         ((1, 20, 5, 2), 7, 2, 3), ((2, 13, 6, 11), 7, 1, 3),
         # a strided map small enough for the dense (position-matrix) form
         ((2, 3, 4, 5), 7, 2, 3),
         # the native kernels' channel blocks: 64 + 16 + 16 + a tail of 4; 16 + 16 + 8, strided
         ((2, 6, 5, 100), 7, 1, 3), ((3, 10, 9, 40), 5, 2, 2), ((2, 5, 6, 24), 3, 1, 0)]


@pytest.mark.parametrize("method", ["shifted", "native"])
@pytest.mark.parametrize("shape,ksize,stride,pad", CASES)
def test_cpu_forms_match_lax_forward_and_gradients(shape, ksize, stride, pad, method):
  _load(method)
  x, k, rs = _pair(shape, 0, ksize)
  n, h, w, c = shape
  g = rs.standard_normal((n, (h + 2 * pad - ksize) // stride + 1,
                          (w + 2 * pad - ksize) // stride + 1, c)).astype(np.float32)

  b = rs.standard_normal(c).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(method, x, k, b, g):
    def f(x, k, b):
      return layers.depthwise_conv2d(x, k, b, stride=stride, padding=pad, method=method)
    y = f(x, k, b)
    return (y, *jax.grad(lambda x, k, b: jnp.sum(f(x, k, b) * g), argnums=(0, 1, 2))(x, k, b))

  got, ref = run(method, x, k, b, g), run("lax", x, k, b, g)
  assert got[0].shape == ref[0].shape
  for a, b in zip(got, ref):
    _close(a, b)


@pytest.mark.parametrize("shape,ksize,stride,pad", CASES + [((6, 16, 16, 3), 7, 1, 3)])
def test_every_kernel_gradient_form_matches_lax(shape, ksize, stride, pad):
  # kernel_grad picks one form by map and batch size; each must be right on every case (the FFT
  # form is for stride 1 only).
  x, _, rs = _pair(shape, 1, ksize)
  n, h, w, c = shape
  g = rs.standard_normal((n, (h + 2 * pad - ksize) // stride + 1,
                          (w + 2 * pad - ksize) // stride + 1, c)).astype(np.float32)

  @jax.jit
  def ref(x, g):
    def f(k):
      return layers.depthwise_conv2d(x, k, stride=stride, padding=pad, method="lax")
    return jax.vjp(f, jnp.zeros((ksize, ksize, 1, c), jnp.float32))[1](g)[0]

  forms = [kernel_grad.pairs, kernel_grad.rows]
  if stride == 1:
    forms.append(lambda x, g, kh, kw, _, padding: kernel_grad.fft(x, g, kh, kw, padding))
  got = jax.jit(lambda x, g: [f(x, g, ksize, ksize, (stride,) * 2, (pad,) * 2) for f in forms])(x, g)
  for dk in got:
    _close(dk, ref(x, g))


@pytest.mark.parametrize("shape,ksize,pad", [((2, 14, 15, 24), 7, 3), ((2, 16, 14, 25), 3, 1),
                                             ((1, 17, 16, 24), 3, 0)])
def test_large_stride_one_maps_take_the_fft_kernel_gradient(shape, ksize, pad, monkeypatch):
  """The FFT form is the one chosen on maps of 14x14 or more with 24 channels or more at stride 1
  (odd and non-square sizes, 'same' and 'valid' padding), and the gradient through it matches
  lax; with fewer channels rows stays."""
  x, k, rs = _pair(shape, 2, ksize)
  n, h, w, c = shape
  ho, wo = h + 2 * pad - ksize + 1, w + 2 * pad - ksize + 1
  g = rs.standard_normal((n, ho, wo, c)).astype(np.float32)
  calls = []
  real = kernel_grad.fft

  def spy(*args):
    calls.append(args[0].shape)
    return real(*args)

  monkeypatch.setattr(kernel_grad, "fft", spy)
  got = jax.grad(lambda k: jnp.sum(layers.depthwise_conv2d(x, k, padding=pad,
                                                            method="shifted") * g))(k)
  ref = jax.grad(lambda k: jnp.sum(layers.depthwise_conv2d(x, k, padding=pad, method="lax") * g))(k)
  assert calls == [shape]
  _close(got, ref)
  jax.grad(lambda k: jnp.sum(layers.depthwise_conv2d(x[..., :8], k[..., :8], padding=pad,
                                                      method="shifted") * g[..., :8]))(k)
  assert calls == [shape]  # 8 channels: not the FFT
  assert [kernel_grad.fft_size(m) for m in (20, 62, 34, 7, 1, 0)] == [20, 64, 36, 8, 1, 1]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU fusion decisions")
def test_tap_sum_computed_once_with_several_consumers():
  # Three consumers of the conv output, like the LayerNorm after it: XLA:CPU would fuse the
  # 49-tap sum into each (3x the work) unless it is materialised once (ops.materialised).
  x, k, _ = _pair((2, 9, 9, 3))

  def f(x, k):
    y = layers.depthwise_conv2d(x, k, padding=3, method="shifted")
    return jnp.mean(y, -1), jnp.var(y, -1), y * 2.0

  hlo = jax.jit(f).lower(x, k).compile(
      compiler_options=steps.compiler_options("cpu")).as_text()
  # A computation holding the tap sum takes ~49 slices of the padded input (XLA may fold one).
  per_computation = [len(re.findall(r"f32\[2,9,9,3\]\S* slice\(", c))
                     for c in re.split(r"\n(?=\S)", hlo)]
  assert sum(n >= 40 for n in per_computation) == 1, per_computation


def test_dense_form_on_small_maps_only():
  # ConvNeXt's 7x7: 4x4 and 2x2 maps (16 < 49, 4 < 9 terms) take the dense form, 8x8 the taps.
  wins = shifted.dense_wins
  assert wins(4, 4, 4, 4, 7, 7, (1, 1), (3, 3)) and wins(2, 2, 2, 2, 7, 7, (1, 1), (3, 3))
  assert not wins(8, 8, 8, 8, 7, 7, (1, 1), (3, 3))
  assert not wins(3, 3, 3, 3, 3, 3, (1, 1), (1, 1))


class _Gpu:
  platform = "gpu"


def test_method_chosen_from_the_devices_and_errors(monkeypatch):
  _load("native")
  # The suite's 8 fake devices: the partitionable XLA form; one device: the native kernels.
  assert jax.device_count() == 8 and jax.default_backend() == "cpu"
  assert cpu.choose_method(jax.devices()) == "shifted"
  assert cpu.choose_method(jax.devices()[:1]) == "native"
  assert cpu.choose_method([_Gpu()]) == "lax"
  monkeypatch.setattr(native, "loaded", lambda: False)  # not loaded (CSPINE_NATIVE=0, no g++)
  assert cpu.choose_method(jax.devices()[:1]) == "shifted"
  with pytest.raises(ValueError, match="needs the devices"):
    cpu.choose_method([])
  for method in ("fft", "auto"):  # "auto" is resolved before a model is built
    with pytest.raises(ValueError, match="unknown depthwise conv method"):
      layers.depthwise_conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((7, 7, 1, 3)), method=method)
  with pytest.raises(ValueError, match="kernel"):
    layers.depthwise_conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((7, 7, 1, 4)))


def test_module_matches_nnx_conv_parameters():
  rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
  dw = layers.DepthwiseConv2d(6, 7, method="shifted", rngs=rngs)
  conv = nnx.Conv(6, 6, (7, 7), padding=3, feature_group_count=6, rngs=rngs)
  assert dw.kernel.shape == conv.kernel.shape == (7, 7, 1, 6)
  assert dw.bias.shape == conv.bias.shape
  conv.kernel[...] = dw.kernel[...]
  conv.bias[...] = jnp.arange(6.0)
  dw.bias[...] = jnp.arange(6.0)
  x = np.random.RandomState(1).standard_normal((2, 8, 8, 6)).astype(np.float32)
  _close(jax.jit(lambda x: dw(x))(x), jax.jit(lambda x: conv(x))(x))


def test_bfloat16_close_to_float32():
  x, k, _ = _pair((2, 8, 8, 4))
  f = jax.jit(lambda x, k: layers.depthwise_conv2d(x, k, padding=3, method="shifted"))
  y32 = f(x, k)
  y16 = f(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  _close(y16.astype(jnp.float32), y32, rtol=2e-2)


def test_gelu_matches_exact_gelu_values_and_gradients():
  rs = np.random.RandomState(2)
  x = np.concatenate([rs.standard_normal(4000) * 3, np.linspace(-10, 10, 2001)]).astype(np.float32)
  g = rs.standard_normal(x.shape).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(f, x, g):
    y, vjp = jax.vjp(f, x)
    return y, vjp(g)[0]

  y, dx = run(layers.gelu, x, g)
  y_ref, dx_ref = run(functools.partial(jax.nn.gelu, approximate=False), x, g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=2e-6)
  y16 = jax.jit(layers.gelu)(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16


# (x shape, k, Cout): the ConvNeXt stem (4x4/4 on 3 channels) and downsample (2x2/2), sizes that
# are not multiples of k (the last rows/columns get zero gradient), a batch of 1.
PATCH_CASES = [((2, 18, 17, 3), 4, 5), ((3, 9, 8, 5), 2, 7), ((1, 8, 8, 6), 2, 4)]


@pytest.mark.parametrize("shape,k,cout", PATCH_CASES)
def test_patch_conv_matches_lax_forward_and_gradients(shape, k, cout):
  rs = np.random.RandomState(3)
  x = rs.standard_normal(shape).astype(np.float32)
  kernel = rs.standard_normal((k, k, shape[-1], cout)).astype(np.float32)
  n, h, w, _ = shape
  g = rs.standard_normal((n, h // k, w // k, cout)).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(f, x, kernel, g):
    y, vjp = jax.vjp(f, x, kernel)
    return (y, *vjp(g))

  def ref(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (k, k), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  got = run(functools.partial(layers.patch_conv, method="shifted"), x, kernel, g)
  want = run(ref, x, kernel, g)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    _close(a, b)
  with pytest.raises(ValueError, match="patch_conv wants"):
    layers.patch_conv(x, kernel[:, :, :1])


@pytest.mark.parametrize("shape,dout", [((3, 5, 4, 7), 9), ((37, 6), 3), ((2, 40, 33), 1)])
def test_dense_matches_library_values_and_gradients(shape, dout):
  """layers.dense's CPU VJP (kernel gradient contracting rows, bias gradient by col_sum) against
  the library dot and nnx.Linear, with and without a bias."""
  rs = np.random.RandomState(4)
  x = rs.standard_normal(shape).astype(np.float32)
  kernel = rs.standard_normal((shape[-1], dout)).astype(np.float32)
  bias = rs.standard_normal(dout).astype(np.float32)
  g = rs.standard_normal(shape[:-1] + (dout,)).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def run(method, use_bias, x, kernel, bias, g):
    f = (lambda x, k, b: layers.dense(x, k, b, method=method)) if use_bias else (
        lambda x, k, b: layers.dense(x, k, method=method) + 0 * b)
    y, vjp = jax.vjp(f, x, kernel, bias)
    return (y, *vjp(g))

  for use_bias in (True, False):
    got, want = run("shifted", use_bias, x, kernel, bias, g), run("lax", use_bias, x, kernel, bias, g)
    for a, b in zip(got, want):
      assert a.shape == b.shape
      _close(a, b)
  linear = nnx.Linear(shape[-1], dout, rngs=nnx.Rngs(0))
  linear.kernel[...], linear.bias[...] = kernel, bias
  _close(layers.dense(x, kernel, bias, method="shifted"), linear(x))
  _close(ops.col_sum(x), x.reshape(-1, shape[-1]).sum(0))
  x2, g2 = x.reshape(-1, shape[-1]), g.reshape(-1, dout)  # weight gradient, wide and tall results
  for a, b in ((x2, g2), (g2, x2)):
    got = jax.jit(ops.row_contraction)(a, b)
    assert got.shape == (a.shape[1], b.shape[1])
    _close(got, a.T @ b)


@pytest.mark.parametrize("shape", [(4, 3, 5, 40), (7, 80), (3, 2, 2, 5)])
def test_normalize_matches_layer_norm_values_and_gradients(shape):
  """layers.normalize (CPU VJP) against nnx.LayerNorm with unit scale and zero shift, and
  against its own library path, values and input gradients (rows with a large mean, too)."""
  rs = np.random.RandomState(5)
  x = (rs.standard_normal(shape) * 2 + rs.standard_normal(shape[:-1] + (1,)) * 3).astype(np.float32)
  g = rs.standard_normal(shape).astype(np.float32)
  ln = nnx.LayerNorm(shape[-1], epsilon=1e-6, rngs=nnx.Rngs(0))

  @functools.partial(jax.jit, static_argnums=0)
  def run(f, x, g):
    y, vjp = jax.vjp(f, x)
    return y, vjp(g)[0]

  want = run(ln, x, g)
  for method in ("shifted", "lax"):
    got = run(lambda x, m=method: layers.normalize(x, 1e-6, method=m), x, g)
    for a, b in zip(got, want):
      _close(a, b, rtol=2e-5)
  y16 = jax.jit(lambda x: layers.normalize(x, 1e-6, method="shifted"))(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16


def test_cpu_steps_keep_freed_host_memory_for_the_next_step():
  """XLA:CPU's per-step scratch buffers (tens of MB) are reused, not page-faulted in afresh."""
  import resource
  import sys
  if not sys.platform.startswith("linux") or not runtime.keep_freed_host_memory():
    pytest.skip("glibc only")
  faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = np.ones(8 * 2**20)  # 64 MB: above glibc's largest mmap threshold (32 MB)
  del block
  before = faults()
  block = np.ones(8 * 2**20)
  # Unmapped on free it faults in again (16,384 pages, ~500 with transparent huge pages).
  assert faults() - before < 50
  del block


@pytest.mark.parametrize("method", ["shifted", "native"])
@pytest.mark.parametrize("shape", [(2, 9, 11, 100), (3, 4, 5, 24), (2, 2, 2, 8)])
def test_conv_then_normalize_matches_the_library_ops(shape, method):
  # ConvNeXt's depthwise conv + LayerNorm (no affine): one native call against lax's conv and
  # the plain formulas, values and all three gradients.
  _load(method)
  x, k, rs = _pair(shape, 3)
  b = rs.standard_normal(shape[-1]).astype(np.float32)
  g = rs.standard_normal(shape).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(fused, x, k, b, g):
    def f(x, k, b):
      if fused:
        return layers.depthwise_conv2d_normalize(x, k, b, 1e-6, padding=3, method=method)
      return layers.normalize(layers.depthwise_conv2d(x, k, b, padding=3, method="lax"), 1e-6,
                              method="lax")
    y, vjp = jax.vjp(f, x, k, b)
    return (y, *vjp(g))

  got, want = run(True, x, k, b, g), run(False, x, k, b, g)
  if method == "native":
    assert "cspine_depthwise_forward_normalized" in run.lower(True, x, k, b, g).as_text()
  for a, w in zip(got, want):
    _close(a, w, rtol=2e-5)


@pytest.mark.parametrize("method", ["shifted", "native"])
def test_conv_then_layer_norm_with_affine_matches_the_library_ops(method):
  # The affine form (ConvNeXt's eval path): values and the gradients of all five inputs.
  _load(method)
  x, k, rs = _pair((2, 9, 11, 100), 4)
  b, s, t = (rs.standard_normal(100).astype(np.float32) for _ in range(3))
  g = rs.standard_normal(x.shape).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(fused, *args):
    def f(x, k, b, s, t):
      if fused:
        return layers.depthwise_conv2d_normalize(x, k, b, 1e-6, s, t, padding=3, method=method)
      y = layers.depthwise_conv2d(x, k, b, padding=3, method="lax")
      return layers.normalize(y, 1e-6, method="lax") * s + t
    y, vjp = jax.vjp(f, *args)
    return (y, *vjp(g))

  got, want = run(True, x, k, b, s, t), run(False, x, k, b, s, t)
  for a, w in zip(got, want):
    _close(a, w, rtol=2e-5)
  with pytest.raises(ValueError, match="both scale and shift"):
    layers.depthwise_conv2d_normalize(x, k, b, 1e-6, s, None, padding=3, method=method)


def test_bias_add_and_layer_norm_cpu_forms_match_autodiff():
  rs = np.random.RandomState(7)
  x = rs.standard_normal((3, 5, 6, 16)).astype(np.float32)
  s, t, g = (rs.standard_normal(16).astype(np.float32), rs.standard_normal(16).astype(np.float32),
             rs.standard_normal((3, 5, 6, 16)).astype(np.float32))

  @functools.partial(jax.jit, static_argnums=0)
  def run(method, x, s, t):
    def f(x, s, t):
      return layers.add_bias(layers.layer_norm(x, s, t, 1e-6, method=method), s, method=method)
    y, vjp = jax.vjp(f, x, s, t)
    return (y, *vjp(g))

  for a, w in zip(run("shifted", x, s, t), run("lax", x, s, t)):
    _close(a, w)
  norm = nnx.LayerNorm(16, epsilon=1e-6, rngs=nnx.Rngs(0))
  norm.scale[...], norm.bias[...] = s, t
  _close(layers.layer_norm(x, s, t, 1e-6, method="shifted"), norm(x))


def _ffi(target, results, *args, stride=(1, 1), padding=(3, 3), **attrs):
  out = [jax.ShapeDtypeStruct(s, jnp.float32) for s in results]
  return jax.ffi.ffi_call(target, out)(
      *args, sh=np.int64(stride[0]), sw=np.int64(stride[1]), ph=np.int64(padding[0]),
      pw=np.int64(padding[1]), **attrs)


def test_native_targets_refuse_shapes_and_strides_they_cannot_run():
  """The C++ handlers check every extent their loops index by (batch, channels, bias length) and
  the strides (a divisor) and return an error, where they would read past a buffer or crash."""
  _load("native")
  rs = np.random.RandomState(0)
  x = rs.standard_normal((2, 8, 8, 4)).astype(np.float32)
  k = rs.standard_normal((7, 7, 4)).astype(np.float32)
  b = np.zeros(4, np.float32)
  fwd, norm = "cspine_depthwise_forward", "cspine_depthwise_forward_normalized"
  igrad, kgrad = "cspine_depthwise_input_grad", "cspine_depthwise_kernel_grad"
  (y,) = _ffi(fwd, [(2, 8, 8, 4)], x, k, b)  # the shapes that fit run
  _close(y, layers.depthwise_conv2d(x, k[:, :, None], b, padding=3, method="lax"))
  empty = np.zeros((0,), np.float32)
  bad = [
      (lambda: _ffi(fwd, [(3, 8, 8, 4)], x, k, b), r"forward: want .*got x \(2, 8, 8, 4\).* y \(3"),
      (lambda: _ffi(fwd, [(2, 8, 8, 4)], x, k, b[:3]), r"bias \(3\)"),
      (lambda: _ffi(fwd, [(2, 8, 8, 4)], x, k, b, stride=(0, 1)), r"strides > 0.*stride \(0, 1\)"),
      (lambda: _ffi(fwd, [(2, 8, 8, 4)], x, k, b, padding=(-1, 3)), r"padding \(-1, 3\)"),
      (lambda: _ffi(norm, [(3, 8, 8, 4), (3, 8, 8)], x, k, b, empty, empty, eps=np.float32(1e-6)),
       r"forward normalized: want .* y \(3, 8, 8, 4\)"),
      (lambda: _ffi(norm, [(2, 8, 8, 4), (2, 8, 8)], x, k, np.zeros(9, np.float32), empty, empty,
                    eps=np.float32(1e-6)), r"forward normalized: .*bias \(9\)"),
      (lambda: _ffi(norm, [(2, 8, 8, 4), (2, 8, 8)], x, k, b, empty, empty, stride=(1, -2),
                    eps=np.float32(1e-6)), r"forward normalized: want strides > 0"),
      (lambda: _ffi(igrad, [(3, 8, 8, 4)], x, k), r"input grad: .*got g \(2, 8, 8, 4\).* dx \(3"),
      (lambda: _ffi(igrad, [(2, 8, 8, 4)], x, k, stride=(2, 0)), r"input grad: want strides > 0"),
      (lambda: _ffi(kgrad, [(7, 7, 4)], x, x[:1]), r"kernel grad: .*g \(1, 8, 8, 4\)"),
      (lambda: _ffi(kgrad, [(7, 7, 4)], x, x, stride=(0, 0)), r"kernel grad: want strides > 0"),
  ]
  for call, message in bad:
    with pytest.raises(Exception, match=message) as e:
      jax.block_until_ready(call())
    assert "INVALID_ARGUMENT" in str(e.value) or "Invalid argument" in str(e.value), e.value
