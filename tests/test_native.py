"""The native depthwise kernels (models/cpu/native.py, models/cpu/depthwise_cpu.cc): how they are built,
cached, loaded only where asked and turned off, and that they run under a sharded jit. Their
numerics against lax are in test_depthwise.py (every case, forward and both gradients)."""
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cspine_jax.models import cpu, layers, registry
from cspine_jax.models.cpu import native

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def loaded():
  """The native kernels, loaded as a run's start loads them."""
  assert native.load_once(), "the native kernels should build here (g++ is on every machine kind)"


def _conv_and_grads(method):
  def f(x, k, b):
    return layers.depthwise_conv2d(x, k, b, padding=3, method=method)

  def run(x, k, b, g):
    y, vjp = jax.vjp(f, x, k, b)
    return (y, *vjp(g))
  return run


def _inputs(shape=(8, 9, 7, 20), seed=0):
  rs = np.random.RandomState(seed)
  x = rs.standard_normal(shape).astype(np.float32)
  k = rs.standard_normal((7, 7, 1, shape[-1])).astype(np.float32)
  b = rs.standard_normal(shape[-1]).astype(np.float32)
  g = rs.standard_normal(shape).astype(np.float32)
  return x, k, b, g


def test_a_failing_compiler_gives_an_error_that_shows_its_output(tmp_path, monkeypatch):
  script = tmp_path / "broken-cxx"
  script.write_text("#!/bin/sh\necho 'cc1plus: fatal error: out of disk' >&2\nexit 1\n")
  script.chmod(0o755)
  monkeypatch.setenv("CXX", str(script))
  monkeypatch.setenv("CSPINE_NATIVE_CACHE", str(tmp_path / "cache"))
  with pytest.raises(native.NativeBuildError, match=r"(?s)broken-cxx .*failed \(1\).*out of disk"):
    native.load()
  assert not list((tmp_path / "cache").glob("*.so*"))  # no half-written library left behind


def _planted_library(tmp_path, marker):
  """A loadable shared object that, once loaded, writes `marker` (what a planted library could
  do with this process's rights)."""
  src = tmp_path / "planted.cc"
  src.write_text('#include <cstdio>\n'
                 f'__attribute__((constructor)) static void planted() {{ '
                 f'std::FILE* f = std::fopen("{marker}", "w"); if (f) std::fclose(f); }}\n')
  out = tmp_path / "planted.so"
  subprocess.run([native._compiler(), "-shared", "-fPIC", str(src), "-o", str(out)],  # pylint: disable=protected-access
                 check=True, capture_output=True)
  return out.read_bytes()


def test_a_cached_library_is_loaded_only_if_it_is_the_one_built_here(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  monkeypatch.setenv("CSPINE_NATIVE_CACHE", str(cache))
  path = native.library_path(native._compiler())  # pylint: disable=protected-access
  assert cache.stat().st_mode & 0o777 == 0o700  # made private
  # A replaced (or cut-short, or foreign) file under the library's name is not loaded: its hash is
  # not the one recorded at build time, so it is built again.
  marker = tmp_path / "planted-was-loaded"
  path.write_bytes(_planted_library(tmp_path, marker))
  assert not native.verified(path)
  lib = native.load()
  assert not marker.exists()
  assert hasattr(lib, "CspineDepthwiseForward") and path.stat().st_size > 10_000
  assert native.verified(path)
  assert (cache / (path.name + native.HASH_SUFFIX)).read_text().strip() == (
      hashlib.sha256(path.read_bytes()).hexdigest())
  # A library without its recorded hash is not trusted either.
  (cache / (path.name + native.HASH_SUFFIX)).unlink()
  assert not native.verified(path)
  # The key covers the source, compiler, flags, jaxlib and CPU: another CPU gets its own file.
  monkeypatch.setattr(native, "_cpu_signature", lambda: "model name: another CPU")
  assert native.library_path(native._compiler()) != path  # pylint: disable=protected-access


def test_a_cache_folder_other_users_could_write_is_refused(tmp_path, monkeypatch):
  shared = tmp_path / "shared"
  shared.mkdir()
  shared.chmod(0o777)
  monkeypatch.setenv("CSPINE_NATIVE_CACHE", str(shared))
  with pytest.raises(native.NativeBuildError,
                     match=r"refusing the native kernel cache .*shared: its group or other users "
                     r"can write it \(mode 777\)"):
    native.load()
  assert not list(shared.iterdir())  # nothing built or loaded there
  # A folder of another user (even a private one) and a link are refused too.
  own = tmp_path / "own"
  own.mkdir(mode=0o700)
  monkeypatch.setenv("CSPINE_NATIVE_CACHE", str(own))
  assert native.cache_dir() == own
  real_uid = os.getuid()
  monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
  with pytest.raises(native.NativeBuildError, match=f"belongs to user id {real_uid}, not"):
    native.cache_dir()
  monkeypatch.setattr(os, "getuid", lambda: real_uid)
  (tmp_path / "link").symlink_to(own)
  monkeypatch.setenv("CSPINE_NATIVE_CACHE", str(tmp_path / "link"))
  with pytest.raises(native.NativeBuildError, match="not a folder"):
    native.cache_dir()


def test_a_refused_cache_folder_means_the_xla_form_with_a_warning(tmp_path):
  shared = tmp_path / "shared"
  shared.mkdir()
  shared.chmod(0o777)
  code = ("import jax; from flax import nnx; from cspine_jax.models import registry; "
          "from cspine_jax.models.cpu import native; "
          "ok = native.load_once(); "
          "m = nnx.eval_shape(lambda: registry.make_model({'name': 'stage2', 'encoder': "
          "'convnext_test'}, rngs=nnx.Rngs(0), devices=jax.devices()[:1])); "
          "print(ok, m.encoder.dw_method)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CSPINE_NATIVE_CACHE=str(shared))
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, check=True)
  assert done.stdout.split() == ["False", "shifted"]
  assert "native depthwise kernels unavailable, the XLA form is used" in done.stderr
  assert f"refusing the native kernel cache {shared}" in done.stderr
  assert not list(shared.iterdir())


@pytest.mark.parametrize("env,devices,want", [({}, 1, ["shifted", "True", "native"]),
                                               ({"CSPINE_NATIVE": "0"}, 1,
                                                ["shifted", "False", "shifted"]),
                                               ({}, 2, ["shifted", "True", "shifted"])])
def test_a_model_takes_the_native_kernels_on_one_cpu_device_once_loaded(env, devices, want):
  # Building (and tracing) a model loads nothing: before `load_once` its form is "shifted".
  code = ("import jax; from flax import nnx; from cspine_jax.models import registry; "
          "from cspine_jax.models.cpu import native; "
          "cfg = {'name': 'stage2', 'encoder': 'convnext_test'}; "
          "build = lambda: nnx.eval_shape(lambda: registry.make_model(cfg, rngs=nnx.Rngs(0), "
          "devices=jax.devices())).encoder.dw_method; "
          "print(build(), native.load_once(), build())")
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  assert out == want


def test_building_and_tracing_a_model_loads_nothing(monkeypatch):
  # Only a run's start (train.runtime.start) builds and loads the kernels.
  for name in ("load", "load_once"):
    monkeypatch.setattr(native, name, lambda: pytest.fail("a model build loaded the kernels"))
  model = nnx.eval_shape(lambda: registry.make_model(
      {"name": "stage2", "encoder": "convnext_test"}, rngs=nnx.Rngs(0),
      devices=jax.devices()[:1]))
  assert model.encoder.dw_method == ("native" if native.loaded() else "shifted")
  x = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.float32)
  jax.eval_shape(lambda s, x: nnx.merge(nnx.graphdef(model), s)(x), nnx.state(model), x)


def test_native_asked_for_where_it_is_not_loaded_says_so(monkeypatch):
  monkeypatch.setattr(native, "loaded", lambda: False)
  assert cpu.choose_method(jax.devices()[:1]) == "shifted"
  x, k, b, _ = _inputs()
  with pytest.raises(native.NativeBuildError, match="not loaded"):
    layers.depthwise_conv2d(x, k, b, padding=3, method="native")


def test_other_dtypes_take_the_xla_form(loaded):
  x, k, b, _ = _inputs((2, 8, 8, 16))
  f = jax.jit(lambda x, k, b: layers.depthwise_conv2d(x, k, b, padding=3, method="native"))
  assert "cspine_depthwise" in f.lower(x, k, b).as_text()
  x16, k16, b16 = (a.astype(jnp.bfloat16) for a in (x, k, b))
  assert "cspine_depthwise" not in f.lower(x16, k16, b16).as_text()
  y16 = f(x16, k16, b16)
  assert y16.dtype == jnp.bfloat16
  want = f(x, k, b)
  np.testing.assert_allclose(np.asarray(y16, np.float32), want, rtol=0.05,
                             atol=0.03 * np.abs(want).max())


def test_a_batch_sharded_over_eight_devices_gives_the_single_device_result(loaded):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  x, k, b, g = _inputs()
  run = _conv_and_grads("native")
  want = jax.jit(run)(x, k, b, g)
  batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  got = jax.jit(run, in_shardings=(batch, rep, rep, batch))(
      jax.device_put(x, batch), k, b, jax.device_put(g, batch))
  for a, w in zip(got, want):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_an_unwritable_home_builds_into_a_private_temporary_folder(tmp_path, monkeypatch):
  home = tmp_path / "home"
  home.mkdir()
  home.chmod(0o500)  # read-only home (root ignores modes, so the refusal is faked below too)
  tmp = tmp_path / "tmp"
  tmp.mkdir(mode=0o777)
  monkeypatch.delenv("CSPINE_NATIVE_CACHE", raising=False)
  monkeypatch.setattr(pathlib.Path, "home", staticmethod(lambda: home))
  monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp))
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(home))
                      else real_access(p, mode))
  try:
    folder = native.cache_dir()
    assert folder == tmp / f"cspine_jax_native_{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700
    # The shared temporary directory is where another user could make that folder first.
    folder.chmod(0o777)
    with pytest.raises(native.NativeBuildError, match="refusing the native kernel cache"):
      native.cache_dir()
  finally:
    home.chmod(0o700)


def test_the_kernel_gradient_is_the_same_to_the_bit_every_call(loaded):
  # Training runs must repeat exactly: the kernel gradient's sum over rows may not depend on which
  # pool thread took which rows (per-thread accumulators did: the demo's scores moved run to run).
  x = jax.random.normal(jax.random.key(0), (16, 28, 28, 96))
  k = jax.random.normal(jax.random.key(1), (7, 7, 1, 96))
  grad = jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(
      layers.depthwise_conv2d(x, k, padding=3, method="native")))))
  first = np.asarray(grad(k))
  for _ in range(30):
    np.testing.assert_array_equal(np.asarray(grad(k)), first)
