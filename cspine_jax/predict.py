"""``python -m cspine_jax.predict``: the inference command (implemented in cspine_jax.infer.predict)."""
import sys

from cspine_jax.infer.predict import main

if __name__ == "__main__":
  sys.exit(main())
