"""train.flops: matmul and convolution FLOPs counted from a function's jaxpr (the MFU numerator)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import lax

from cspine_jax.models import convnext
from cspine_jax.train import flops


def test_dot_and_grouped_conv_by_hand():
  a, b = jnp.ones((8, 5)), jnp.ones((5, 3))
  assert flops.count(jnp.dot, a, b) == 2 * 8 * 5 * 3
  batched = lambda x, y: jnp.einsum("bij,bjk->bik", x, y)
  assert flops.count(batched, jnp.ones((4, 8, 5)), jnp.ones((4, 5, 3))) == 4 * 2 * 8 * 5 * 3
  x, k = jnp.ones((2, 10, 10, 6)), jnp.ones((3, 3, 2, 12))  # 3 groups of 2 input features

  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
  assert flops.count(conv, x, k) == 2 * (2 * 10 * 10 * 12) * (3 * 3 * 2)
  # Autodiff's input and kernel gradients are convolutions too (feature / batch groups on the
  # GPU path): each costs what the forward does.
  grads = jax.grad(lambda x, k: jnp.sum(conv(x, k)), argnums=(0, 1))
  assert flops.count(grads, x, k) == 3 * flops.count(conv, x, k)
  assert flops.count(lambda x: jnp.tanh(x) * 2 + 1, x) == 0  # elementwise work is not counted


def test_nested_jit_scan_cond_and_gradients():
  a, b = jnp.ones((8, 5)), jnp.ones((5, 3))
  one = 2 * 8 * 5 * 3
  # A jit with compiler options (as the train steps have) cannot be nested in make_jaxpr: its
  # own trace is used.
  step = jax.jit(lambda a, b: jnp.dot(a, b) @ jnp.ones((3, 2)),
                 compiler_options={"xla_backend_optimization_level": 1})
  assert flops.count(step, a, b) == one + 2 * 8 * 3 * 2
  looped = lambda a, b: lax.scan(lambda c, _: (c, a @ b), 0.0, None, length=4)[1]
  assert flops.count(looped, a, b) == 4 * one
  branch = lambda p, a, b: lax.cond(p, lambda: (a @ b) @ b.T, lambda: a @ jnp.ones((5, 5)))
  assert flops.count(branch, True, a, b) == one + 2 * 8 * 3 * 5  # the costlier branch
  # The gradient w.r.t. a alone: forward and input gradient (the weight gradient is not needed).
  assert flops.count(jax.grad(lambda a: jnp.sum(a @ b)), a) == 2 * one


@pytest.mark.parametrize("variant,gmacs", [("tiny", 4.47)])
def test_convnext_forward_matches_published_count(variant, gmacs):
  """ConvNeXt-Tiny at 224 px: 4.47 G multiply-adds per image (timm's and the paper's 4.5 GFLOPs),
  counted with the library depthwise conv (as on GPU) on an abstract model: nothing is allocated."""
  model = nnx.eval_shape(lambda: convnext.ConvNeXt(variant, dw_method="lax", rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  got = flops.count(lambda s, x: nnx.merge(graphdef, s)(x), state, image)
  assert got / 2 / 1e9 == pytest.approx(gmacs, rel=0.01)
