"""Ensembles: several U-Nets trained for one task, whose probabilities are averaged.

Shapes: as one model's, an image (C, H, W) in and probabilities (K, H, W) out; every
member takes the same C input channels and gives the same K classes.

Two runs of the same recipe with other seeds (other initial weights, crops and, for a
folder, held-out images) make different mistakes, so the mean of their probabilities is
steadier than either: ``predict`` and ``evaluate`` take several checkpoints for that, and
``tinyunet.data.tiling.predict_tiled`` averages an ``Ensemble``'s members as it averages
test-time augmentation's views (each member predicts with its own depth, padding and
default tile). The members may differ in anything but their channels, classes and the
kind of masks they trained on.
"""

from __future__ import annotations

from .checkpoint import load_model


class Ensemble:
    """Members (tinyunet UNets, or models that predict as they do) averaged as one.

    ``config`` holds what the members share: ``in_channels`` and ``num_classes``.
    ``names`` label the members in errors (default: member 1, 2, ...).
    """

    SHARED = ("in_channels", "num_classes")

    def __init__(self, members, names=None):
        self.members = list(members)
        self.names = list(names) if names is not None else [
            f"member {index + 1}" for index in range(len(self.members))]
        if not self.members:
            raise ValueError("Ensemble: Expect: at least one model. Actual: none.")
        first = self.members[0].config
        for member, name in zip(self.members[1:], self.names[1:], strict=True):
            for key in self.SHARED:
                if member.config[key] != first[key]:
                    raise ValueError(f"Ensemble: Expect: {key} {first[key]} in every member "
                                     f"(as in {self.names[0]}). Actual: {member.config[key]} "
                                     f"in {name}.")
        self.config = {key: first[key] for key in self.SHARED}

    def eval(self):
        for member in self.members:
            member.eval()
        return self


def load_ensemble(paths, backend=None):
    """(model, metas): the U-Net of one checkpoint, or an ``Ensemble`` of several, with
    each checkpoint's metadata."""
    loaded = [load_model(path, backend) for path in paths]
    models = [model for model, _ in loaded]
    metas = [meta for _, meta in loaded]
    if len(models) == 1:
        return models[0], metas
    return Ensemble(models, [str(path) for path in paths]), metas
