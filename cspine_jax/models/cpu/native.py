"""The C++ depthwise conv kernels (`depthwise_cpu.cc`) for XLA:CPU, as jax.ffi targets.

`load_once()` (called where a run starts, `train.runtime.start`) builds the library once per
machine with the host's C++ compiler (`-O3 -march=native`), keeps it in a cache folder keyed by
the source, the compiler, the flags, jaxlib and the CPU, loads it with ctypes and registers its
handlers for the CPU platform. Where that cannot be done (no compiler, a failed build,
CSPINE_NATIVE=0) it logs why once and returns False; models then take the XLA form ("shifted"),
which computes the same. `loaded()` only reports; nothing else here builds.

Environment: CSPINE_NATIVE=0 turns the kernels off; CSPINE_NATIVE_CACHE sets the cache folder
(default ~/.cache/cspine_jax/native, or a folder in the temporary directory where the home
folder cannot be written); CXX names the compiler (default: g++, else c++, clang++).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("depthwise_cpu.cc")
# ffi target name -> exported handler symbol.
TARGETS = {"cspine_depthwise_forward": "CspineDepthwiseForward",
           "cspine_depthwise_forward_normalized": "CspineDepthwiseForwardNormalized",
           "cspine_depthwise_input_grad": "CspineDepthwiseInputGrad",
           "cspine_depthwise_kernel_grad": "CspineDepthwiseKernelGrad"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
BUILD_TIMEOUT_S = 300


class NativeBuildError(RuntimeError):
  """The native kernels could not be built or loaded (the message says why)."""


def _compiler() -> str:
  for name in ([os.environ["CXX"]] if os.environ.get("CXX") else []) + ["g++", "c++", "clang++"]:
    path = shutil.which(name)
    if path:
      return path
  raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU model and its flags (a library built on one CPU
  may not run on another, e.g. on a shared home folder)."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
    lines = [l for l in text.splitlines() if l.startswith(("model name", "flags"))][:2]
    return "\n".join(lines)
  except OSError:
    return platform.processor() or platform.machine()


def cache_dir() -> pathlib.Path:
  """CSPINE_NATIVE_CACHE, else ~/.cache/cspine_jax/native, else (a home folder that cannot be
  written, as on some CI runners) a per-user folder in the temporary directory."""
  if os.environ.get("CSPINE_NATIVE_CACHE"):
    return pathlib.Path(os.environ["CSPINE_NATIVE_CACHE"])
  home = pathlib.Path.home() / ".cache" / "cspine_jax" / "native"
  try:
    home.mkdir(parents=True, exist_ok=True)
    if os.access(home, os.W_OK):
      return home
  except OSError:
    pass
  return pathlib.Path(tempfile.gettempdir()) / f"cspine_jax_native_{os.getuid()}"


def library_path(compiler: str) -> pathlib.Path:
  """Where the library for this source, compiler, flags, jaxlib and CPU lies (or will)."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           timeout=60).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS),
                                  jaxlib.__version__, _cpu_signature()]).encode()).hexdigest()
  return cache_dir() / f"depthwise_cpu-{key[:20]}.so"


def build(compiler: str, out: pathlib.Path) -> None:
  """Compiles the source into `out` (written under a temporary name, then renamed: processes
  building at once each finish with a whole file)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
  os.close(fd)
  cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
      raise NativeBuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                             f"{done.stderr[-2000:]}")
    os.replace(tmp, out)
  except subprocess.TimeoutExpired as e:
    raise NativeBuildError(f"{' '.join(cmd)} took over {BUILD_TIMEOUT_S} s") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load() -> ctypes.CDLL:
  """The built library (building it first where the cache lacks it or holds a broken file)."""
  compiler = _compiler()
  path = library_path(compiler)
  if path.exists():
    try:
      return ctypes.CDLL(str(path))
    except OSError as e:  # a truncated or foreign file: build it again
      logging.warning("native kernels: %s does not load (%s); building it again", path, e)
  build(compiler, path)
  try:
    return ctypes.CDLL(str(path))
  except OSError as e:
    raise NativeBuildError(f"{path} was built but does not load: {e}") from e


_library: ctypes.CDLL | None = None  # kept alive: XLA holds pointers into it
_registered = False


@functools.cache
def load_once() -> bool:
  """Builds (where the cache lacks it) and loads the library and registers its handlers with
  XLA:CPU, once per process; whether the kernels can be used."""
  global _library, _registered
  if os.environ.get("CSPINE_NATIVE", "1") == "0":
    logging.info("native kernels: off (CSPINE_NATIVE=0); the XLA depthwise form is used")
    return False
  try:
    _library = load()
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(_library, symbol)),
                                  platform="cpu")
  except (NativeBuildError, OSError, subprocess.SubprocessError, AttributeError) as e:
    logging.warning("native depthwise kernels unavailable, the XLA form is used instead "
                    "(slower on CPU): %s", e)
    return False
  _registered = True
  return True


def loaded() -> bool:
  """Whether `load_once` has registered the kernels in this process (never builds)."""
  return _registered


def _strides(stride: tuple[int, int], padding: tuple[int, int]) -> dict[str, np.int64]:
  return {"sh": np.int64(stride[0]), "sw": np.int64(stride[1]),
          "ph": np.int64(padding[0]), "pw": np.int64(padding[1])}


def _call(target: str, shape, *args, stride, padding, **attrs):
  """The target's result(s): `shape` one result's shape, or a list of them."""
  if not loaded():
    raise NativeBuildError("the native depthwise kernels are not loaded: native.load_once() "
                           "(train.runtime.start calls it) builds and loads them")
  out = ([jax.ShapeDtypeStruct(s, np.float32) for s in shape] if isinstance(shape, list)
         else jax.ShapeDtypeStruct(shape, np.float32))
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      *args, **_strides(stride, padding), **attrs)


def depthwise_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, out_hw: tuple[int, int],
                      stride: tuple[int, int], padding: tuple[int, int]) -> jax.Array:
  """y (N, HO, WO, C) from float32 x (N, H, W, C), kernel (kh, kw, C) and bias (C,)."""
  return _call("cspine_depthwise_forward", (x.shape[0], *out_hw, x.shape[3]), x, kernel, bias,
               stride=stride, padding=padding)


def depthwise_forward_normalized(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                                 out_hw: tuple[int, int], stride: tuple[int, int],
                                 padding: tuple[int, int], epsilon: float,
                                 scale: jax.Array | None = None, shift: jax.Array | None = None
                                 ) -> tuple[jax.Array, jax.Array]:
  """The forward, then each pixel normalised over its channels (LayerNorm; with `scale` and
  `shift` (C,) its affine part too): (y (N, HO, WO, C), rstd (N, HO, WO) = 1/sqrt(var + eps))."""
  n, c = x.shape[0], x.shape[3]
  if scale is None:  # empty operands: no affine part
    scale = shift = np.zeros((0,), np.float32)
  y, rstd = _call("cspine_depthwise_forward_normalized", [(n, *out_hw, c), (n, *out_hw)],
                  x, kernel, bias, scale, shift, stride=stride, padding=padding,
                  eps=np.float32(epsilon))
  return y, rstd


def depthwise_input_grad(g: jax.Array, kernel: jax.Array, in_hw: tuple[int, int],
                         stride: tuple[int, int], padding: tuple[int, int]) -> jax.Array:
  """dx (N, H, W, C) from the output gradient g (N, HO, WO, C) and kernel (kh, kw, C)."""
  return _call("cspine_depthwise_input_grad", (g.shape[0], *in_hw, g.shape[3]), g, kernel,
               stride=stride, padding=padding)


def depthwise_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                          stride: tuple[int, int], padding: tuple[int, int]) -> jax.Array:
  """dk (kh, kw, C): the kernel gradient, summed over the batch."""
  return _call("cspine_depthwise_kernel_grad", (*kernel_hw, x.shape[3]), x, g,
               stride=stride, padding=padding)
