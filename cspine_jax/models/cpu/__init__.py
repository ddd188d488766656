"""XLA:CPU forms of the model layers, and which form a model takes on the devices it runs on.

`shifted` (method "shifted": the XLA form of the depthwise conv) with `kernel_grad` (its kernel
gradient forms); `native` (the C++ kernels: build, load, calls) with `native_conv` (method
"native": the differentiable depthwise conv through them); `linear` and `norm` (the CPU VJPs of
ConvNeXt's other layers, both CPU methods); `ops` (what they share). `models.layers` dispatches
to these by method.
"""
from __future__ import annotations

from typing import Sequence

import jax

from cspine_jax.models.cpu import native


def choose_method(devices: Sequence[jax.Device]) -> str:
  """The layer form ("native" | "shifted" | "lax") for a model that runs on `devices`.

  "lax" (the library ops) off the CPU. On the CPU, "native" where the native kernels are loaded
  (`native.load_once`) and the model runs on one device, else "shifted": XLA's SPMD partitioner
  cannot split a foreign call, so on several devices it would gather the whole batch onto each
  one, where the "shifted" ops partition.
  """
  devices = list(devices)
  if not devices:
    raise ValueError("choose_method needs the devices the model runs on; got none")
  if devices[0].platform != "cpu":
    return "lax"
  return "native" if len(devices) == 1 and native.loaded() else "shifted"
