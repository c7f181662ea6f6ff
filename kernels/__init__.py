"""Hand-written kernels, installed as ``tinyunet.kernels``.

The numba CPU kernels (fast_ops) and numba.cuda GPU kernels (cuda_ops) live here;
the numpy reference needs none.
"""
