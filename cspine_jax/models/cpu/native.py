"""The C++ depthwise conv kernels (`depthwise_cpu.cc`) for XLA:CPU, as jax.ffi targets.

`load_once()` (called where a run starts, `train.runtime.start`) builds the library once per
machine with the host's C++ compiler (`-O3 -march=native`), keeps it in a cache folder keyed by
the source, the compiler, the flags, jaxlib and the CPU, loads it with ctypes and registers its
handlers for the CPU platform. Where that cannot be done (no compiler, a failed build,
CSPINE_NATIVE=0) it logs why once and returns False; models then take the XLA form ("shifted"),
which computes the same. `loaded()` only reports; nothing else here builds.

Loading a shared library runs its code, so the cache is guarded: the folder must be the user's
own and writable by no one else (a new one is made 0700; another is refused, and the XLA form
used), and a library is loaded only when its SHA-256 matches the one recorded beside it when it
was built (``<library>.sha256``, written last and atomically); any other file is built again.

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
import stat
import subprocess
import tempfile

from absl import logging
import jax
import jaxlib
import numpy as np

from cspine_jax.io import files

SOURCE = pathlib.Path(__file__).with_name("depthwise_cpu.cc")
# ffi target name -> exported handler symbol.
TARGETS = {"cspine_depthwise_forward": "CspineDepthwiseForward",
           "cspine_depthwise_forward_normalized": "CspineDepthwiseForwardNormalized",
           "cspine_depthwise_input_grad": "CspineDepthwiseInputGrad",
           "cspine_depthwise_kernel_grad": "CspineDepthwiseKernelGrad"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
BUILD_TIMEOUT_S = 300
HASH_SUFFIX = ".sha256"  # <library>.sha256: the library's SHA-256, recorded when it was built


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
  written, as on some CI runners) a per-user folder in the temporary directory; made 0700 where
  missing, and refused (NativeBuildError) unless it is a folder of this user that no other user
  can write: anyone who can put a file there could have it loaded into this process."""
  if os.environ.get("CSPINE_NATIVE_CACHE"):
    return private_dir(pathlib.Path(os.environ["CSPINE_NATIVE_CACHE"]))
  home = pathlib.Path.home() / ".cache" / "cspine_jax" / "native"
  try:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.access(home, os.W_OK):
      return private_dir(home)
  except OSError:
    pass
  return private_dir(pathlib.Path(tempfile.gettempdir()) / f"cspine_jax_native_{os.getuid()}")


def private_dir(path: pathlib.Path) -> pathlib.Path:
  """``path``, made 0700 where missing; NativeBuildError unless it is a real folder (not a link)
  owned by this user and not writable by its group or others."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path)
  except OSError as e:
    raise NativeBuildError(f"native kernel cache {path}: cannot create it ({e})") from e
  why = None
  if not stat.S_ISDIR(st.st_mode):
    why = "it is not a folder (a link or a file)"
  elif st.st_uid != os.getuid():
    why = f"it belongs to user id {st.st_uid}, not to this user ({os.getuid()})"
  elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    why = f"its group or other users can write it (mode {stat.S_IMODE(st.st_mode):o})"
  if why:
    raise NativeBuildError(f"refusing the native kernel cache {path}: {why}, so another user "
                           "could plant a library there; remove it, or set CSPINE_NATIVE_CACHE "
                           "to a folder of your own (mode 700)")
  return path


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_path(library: pathlib.Path) -> pathlib.Path:
  return library.with_name(library.name + HASH_SUFFIX)


def verified(library: pathlib.Path) -> bool:
  """Whether ``library`` is the file built here: its SHA-256 is the one recorded at build time."""
  try:
    return _hash_path(library).read_text().strip() == _sha256(library)
  except OSError:
    return False


def library_path(compiler: str) -> pathlib.Path:
  """Where the library for this source, compiler, flags, jaxlib and CPU lies (or will)."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           timeout=60).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS),
                                  jaxlib.__version__, _cpu_signature()]).encode()).hexdigest()
  return cache_dir() / f"depthwise_cpu-{key[:20]}.so"


def build(compiler: str, out: pathlib.Path) -> None:
  """Compiles the source into `out` (written under a temporary name, then renamed: processes
  building at once each finish with a whole file), then records its SHA-256 beside it."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
  os.close(fd)
  cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
      raise NativeBuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                             f"{done.stderr[-2000:]}")
    digest = _sha256(pathlib.Path(tmp))
    os.replace(tmp, out)
    # Written last: a library without its hash (a build cut short here) is built again.
    files.write_text(_hash_path(out), digest + "\n")
  except subprocess.TimeoutExpired as e:
    raise NativeBuildError(f"{' '.join(cmd)} took over {BUILD_TIMEOUT_S} s") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load() -> ctypes.CDLL:
  """The built library (building it first where the cache lacks it, or holds a file whose hash
  is not the one recorded when it was built: broken, cut short or replaced)."""
  compiler = _compiler()
  path = library_path(compiler)
  if path.exists():
    if verified(path):
      try:
        return ctypes.CDLL(str(path))
      except OSError as e:  # e.g. built for a library no longer installed
        logging.warning("native kernels: %s does not load (%s); building it again", path, e)
    else:
      logging.warning("native kernels: %s is not the library built here (its SHA-256 is not the "
                      "one recorded in %s); building it again", path, _hash_path(path).name)
  build(compiler, path)
  if not verified(path):  # another process replaced it since: load nothing unverified
    raise NativeBuildError(f"{path} changed while it was being built; not loading it")
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
