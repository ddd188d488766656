"""Model FLOPs of a function, counted from its jaxpr: matrix multiplies and convolutions.

The model FLOPs utilisation (MFU) of a training step needs the step's FLOPs. XLA's cost analysis
depends on the backend: on GPU the compiled module hides convolutions in cuDNN custom calls,
and an H200 run got no figure from the lowered module at all. Counting the program's own
`dot_general` and `conv_general_dilated` operations (2 FLOPs per multiply-add, as MFU is usually
defined) gives the same figure on every backend, before any compilation. Elementwise work
(norms, activations, the optimizer) is not counted. On CPU the depthwise convolutions run as
shifted multiplies (`models.layers`), not as convolutions, so a CPU count leaves them out (about
2% of ConvNeXt's FLOPs); on GPU they are convolutions and are counted.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core


def count(fn: Callable[..., Any], *args, **kwargs) -> int:
  """FLOPs of one call of ``fn(*args, **kwargs)`` (a jitted function too): 2 x the multiply-adds
  of its matrix multiplies and convolutions, traced with the arguments' shapes (nothing runs)."""
  if hasattr(fn, "trace"):  # a jax.jit function: its own trace (make_jaxpr refuses to nest one
    return _inner(fn.trace(*args, **kwargs).jaxpr)  # with compiler_options)
  return _inner(jax.make_jaxpr(fn)(*args, **kwargs))


def jaxpr_flops(jaxpr: core.Jaxpr) -> int:
  """Matmul and convolution FLOPs of a jaxpr, recursing into the jaxprs its operations call
  (a scan's body times its length, a cond's costliest branch)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _inner(eqn.params["jaxpr"])
    elif name == "while":
      # The trip count is a run-time value: counted once, so a loop makes this a lower bound.
      total += _inner(eqn.params["body_jaxpr"]) + _inner(eqn.params["cond_jaxpr"])
    elif name == "cond":
      total += max(_inner(b) for b in eqn.params["branches"])
    else:  # pjit, custom_jvp/vjp calls, remat, ...: the jaxprs they run, once each
      total += sum(jaxpr_flops(sub) for sub in core.jaxprs_in_params(eqn.params))
  return total


def _inner(sub: core.ClosedJaxpr | core.Jaxpr) -> int:
  return jaxpr_flops(sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub)


def _dot_flops(eqn: core.JaxprEqn) -> int:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  return 2 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _conv_flops(eqn: core.JaxprEqn) -> int:
  """2 x output elements x (kernel taps x input features per group)."""
  rhs_shape = eqn.invars[1].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature dim, in feature dim, ...)
  per_output = math.prod(rhs_shape) // rhs_shape[rhs_spec[0]]
  return 2 * math.prod(out_shape) * per_output
