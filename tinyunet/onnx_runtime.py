"""A tinyunet U-Net exported to ONNX, run by ONNX Runtime on the CPU.

    model = OnnxModel("model.onnx", threads=2)
    logits = predict_logits(model, image)           # tinyunet.data.tiling, as for a UNet

Shapes: ``predict_batch`` maps (N, in_channels, H, W) float32 to logits
(N, num_classes, h, w) float32, as ``UNet.forward`` does.

The file must be one that ``tinyunet.export.to_onnx`` wrote: its metadata holds the
U-Net's config, from which the overlap-tile code learns the depth and padding mode
(``config``, ``valid_input_hw`` and ``output_hw``, shared with ``UNet``). Needs the
``onnxruntime`` package (``pip install 'tinyunet[export]'``), not tinyunet's backends.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .export import INSTALL_HINT, MODEL_MARKER, ExportError
from .nn.unet import UNetGeometry


def require_onnxruntime(purpose: str):
    """The onnxruntime module, or an ImportError that says how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"{purpose} needs the onnxruntime package, which is not installed. "
                          f"Install it with: {INSTALL_HINT}") from error
    return onnxruntime


class OnnxModel(UNetGeometry):
    """An exported U-Net that ``tinyunet.data.tiling.predict_logits`` can drive.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    def __init__(self, path, threads: int | None = None):
        ort = require_onnxruntime("Running an ONNX model")
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        # ONNX Runtime's errors (InvalidProtobuf, InvalidGraph, Fail, ...) derive from
        # Exception itself, not from one base class of their own.
        except Exception as error:  # noqa: BLE001
            raise ExportError(f"{path}: ONNX Runtime cannot load it ({error})") from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        if metadata.get("tinyunet_format") != MODEL_MARKER:
            raise ExportError(f"{path}: not a U-Net exported by tinyunet (no "
                              f"'tinyunet_format: {MODEL_MARKER}' in its metadata), so its "
                              "depth and padding for tiled prediction are unknown")
        try:
            self.config = json.loads(metadata["tinyunet_config"])
            self.depth, self.padding = int(self.config["depth"]), self.config["padding"]
        except (KeyError, TypeError, ValueError) as error:
            raise ExportError(f"{path}: its 'tinyunet_config' metadata is unusable "
                              f"({type(error).__name__}: {error})") from error
        self.path = path
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, K, h, w) float32 of an image batch (N, C, H, W)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def __repr__(self):
        return f"OnnxModel({str(self.path)!r}, config={self.config})"
