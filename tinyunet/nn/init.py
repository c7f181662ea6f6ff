"""Weight initialisation, drawn from one seeded generator so training is reproducible."""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the generator that every new layer's weights are drawn from."""
    global _generator
    _generator = np.random.default_rng(seed)


def he_normal(shape, fan_in: float, dtype=np.float32) -> np.ndarray:
    """Normal weights with std sqrt(2 / fan_in): He et al., and the U-Net paper's choice."""
    return (_generator.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
