"""XLA:CPU formulations of the models' layers: native C++ kernels and their XLA twins."""
