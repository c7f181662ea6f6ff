"""Models that leave tinyunet: ONNX graphs and safetensors weight files.

    tinyunet export --checkpoint best.npz --format onnx --out model.onnx
    to_onnx(model, "model.onnx", opset=17)         # needs the onnx package
    to_safetensors(model, "model.safetensors")      # numpy only
    model = from_safetensors("model.safetensors")   # a tinyunet UNet again

Shapes: the exported U-Net maps an image batch (N, in_channels, H, W) float32 to logits
(N, num_classes, h, w) float32, exactly as ``UNet.forward``: h, w == H, W in 'same'
mode (any H, W: the graph pads the bottom/right to a multiple of 2**depth with zeros
and slices the logits back), h, w == H - m, W - m in 'valid' mode (``UNet.output_hw``
says which H, W can be used and what m is).

ONNX: the graph is built with ``onnx.helper`` from the operators Conv, Relu, MaxPool,
ConvTranspose, Resize (bilinear, ``half_pixel``: tinyunet's ``align_corners=False``
source positions, edge-clamped), Concat, Slice, Pad and a little integer shape
arithmetic. Batch and spatial sizes are symbolic. Initialisers carry the parameter
names of ``UNet.state_dict``.

safetensors: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range (and ``__metadata__``, a map of strings), then the raw
little-endian arrays. Written and read here with numpy alone, so the core needs no
other package. The names and layouts are those of a PyTorch U-Net with the same module
tree (conv weights (C_out, C_in, kH, kW), transposed-conv weights (C_in, C_out, kH, kW)).

Both formats carry ``model_metadata``: the U-Net's constructor arguments as JSON and
how to use it (per-image percentile normalisation in, logits out, sigmoid for one
class, softmax over the classes otherwise).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import secrets
from pathlib import Path

import numpy as np

from . import __version__
from .data.images import normalize_percentile

EXPORT_FORMATS = ("onnx", "safetensors")
SUFFIXES = {".onnx": "onnx", ".safetensors": "safetensors"}
DEFAULT_OPSET = 17
# Opset 13 is the oldest whose Pad, Slice and Resize take their sizes as inputs, which
# the graph needs for dynamic shapes.
MIN_OPSET = 13
MODEL_MARKER = "tinyunet-unet"
INSTALL_HINT = "pip install 'tinyunet[export]'"
# The safetensors format caps the header at 100 MB; a larger one is not such a file.
MAX_SAFETENSORS_HEADER = 100_000_000
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


class ExportError(ValueError):
    """A model file to write or read is unusable; the message names the file."""


def require_onnx(purpose: str):
    """The onnx module, or an ImportError that says how to install it."""
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"{purpose} needs the onnx package, which is not installed. "
                          f"Install it with: {INSTALL_HINT}") from error
    return onnx


# ---- metadata shared by both formats ---------------------------------------------------

def model_metadata(model) -> dict[str, str]:
    """The model's config and its input/output conventions, as a map of strings."""
    config = dict(model.config)
    defaults = inspect.signature(normalize_percentile).parameters
    low, high = defaults["low"].default, defaults["high"].default
    classes = config["num_classes"]
    activation = "sigmoid" if classes == 1 else "softmax"
    if config["padding"] == "same":
        sizes = (f"any H, W; the output has the input's size (sides padded with zeros at "
                 f"the bottom/right to a multiple of {2 ** config['depth']} inside the model, "
                 "the logits cropped back)")
    else:
        sizes = ("unpadded ('valid') U-Net: each side minus 4 per conv pair must be even "
                 "before every pool; the output is smaller by the same margin for every usable "
                 "size (tinyunet's UNet.valid_input_hw and output_hw compute both)")
    return {
        "tinyunet_format": MODEL_MARKER,
        "tinyunet_version": __version__,
        "tinyunet_config": json.dumps(config, sort_keys=True),
        "input": (f"image (N, {config['in_channels']}, H, W) float32, each image and channel "
                  f"normalised by its own percentiles: (x - p{low:g}) / (p{high:g} - p{low:g}), "
                  "not clipped; a flat channel becomes 0"),
        "normalization": json.dumps({"kind": "percentile", "low": low, "high": high,
                                     "axes": "per image and channel, over H and W",
                                     "clip": False}),
        "output": (f"logits (N, {classes}, h, w) float32; "
                   + ("probability = sigmoid(logit), foreground where logit > 0" if classes == 1
                      else "probabilities = softmax over the class axis, labels = argmax")),
        "output_activation": activation,
        "sizes": sizes,
    }


def _write_atomically(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    if path.is_dir():
        raise ExportError(f"{path}: Expect: a file name to write. Actual: a folder.")
    if path.exists() and not overwrite:
        raise ExportError(f"{path}: the file exists; pass overwrite=True (--overwrite) to "
                          "replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if temporary.exists():
            temporary.unlink()
        raise


# ---- ONNX ----------------------------------------------------------------------------

class _GraphBuilder:
    """Collects ONNX nodes and initialisers; every method returns its output's name."""

    def __init__(self, onnx):
        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.nodes, self.initializers = [], []

    def constant(self, name: str, value) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attributes) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def conv(self, x: str, module, prefix: str, relu: bool, name: str | None = None) -> str:
        """``module`` (a tinyunet Conv2d named ``prefix``, padding an int) applied to ``x``,
        then a ReLU if ``relu``; the node is named ``name`` (default ``prefix``)."""
        weight = self.constant(f"{prefix}.weight", module.weight.numpy().astype(np.float32))
        bias = self.constant(f"{prefix}.bias", module.bias.numpy().astype(np.float32))
        y = self.node("Conv", [x, weight, bias], name or prefix,
                      kernel_shape=list(module.kernel_size), pads=[int(module.padding)] * 4)
        return self.node("Relu", [y], f"{prefix}.relu") if relu else y


def _valid_skip_crops(depth: int) -> list[int]:
    """Pixels the unpadded U-Net crops from each side of the skip of every level.

    At each level the encoder's output is larger than the upsampled decoder input by a
    margin that does not depend on the input size: 8 at the level above the bottom
    (the bottom's two convs lose 4, doubled by the up step), and 2 * (m + 8) above a
    level of margin m (that level loses 4 in its encoder's convs, m in its crop and 4 in
    its decoder's convs, doubled by the up step). ``F.center_crop`` cuts half of it from
    each side (the margins are even).
    """
    margins = [0] * depth
    margin = 8
    for level in reversed(range(depth)):
        margins[level] = margin
        margin = 2 * (margin + 8)
    return [m // 2 for m in margins]


def onnx_model(model, opset: int = DEFAULT_OPSET):
    """The ``onnx.ModelProto`` of a tinyunet ``UNet`` (see the module docstring)."""
    onnx = require_onnx("Exporting to ONNX")
    newest = onnx.defs.onnx_opset_version()
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= newest):
        raise ExportError(f"to_onnx: Expect: an opset from {MIN_OPSET} to {newest} (the "
                          f"installed onnx's newest). Actual: {opset!r}.")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    config = model.config
    depth, padding = config["depth"], config["padding"]
    g = _GraphBuilder(onnx)

    x = "image"
    spatial_axes = g.constant("spatial_axes", np.array([2, 3], np.int64))
    if padding == "same":
        # Pad the bottom/right to the next multiple of 2**depth, as UNet.forward does,
        # from the input's runtime shape: extra = ceil(hw / align) * align - hw.
        align = 2**depth
        shape = g.node("Shape", [x], "input_shape")
        hw = g.node("Slice", [shape, g.constant("hw_start", np.array([2], np.int64)),
                              g.constant("hw_end", np.array([4], np.int64))], "input_hw")
        rounded_up = g.node("Add", [hw, g.constant("align_minus_one",
                                                   np.array([align - 1], np.int64))],
                            "hw_plus_align_minus_one")
        blocks = g.node("Div", [rounded_up, g.constant("align", np.array([align], np.int64))],
                        "hw_blocks")
        padded = g.node("Mul", [blocks, "align"], "padded_hw")
        extra = g.node("Sub", [padded, hw], "extra_hw")
        # ONNX pads list all begins, then all ends: (N, C, H, W) begins 0, ends (0, 0, extra).
        pads = g.node("Concat", [g.constant("zero_pads", np.zeros(6, np.int64)), extra],
                      "pads", axis=0)
        x = g.node("Pad", [x, pads], "padded_image", mode="constant")

    skips = []
    for level, encoder in enumerate(model.encoders):
        prefix = f"encoders.{level}"
        x = g.conv(x, encoder.conv1, f"{prefix}.conv1", relu=True)
        x = g.conv(x, encoder.conv2, f"{prefix}.conv2", relu=True)
        if level < depth:
            skips.append(x)
            x = g.node("MaxPool", [x], f"pool{level}", kernel_shape=[2, 2], strides=[2, 2])

    crops = _valid_skip_crops(depth) if padding == "valid" else [0] * depth
    for level in reversed(range(depth)):
        up = model.ups[level]
        prefix = f"ups.{level}"
        if config["up"] == "transpose":
            weight = g.constant(f"{prefix}.weight", up.weight.numpy().astype(np.float32))
            bias = g.constant(f"{prefix}.bias", up.bias.numpy().astype(np.float32))
            x = g.node("ConvTranspose", [x, weight, bias], prefix, kernel_shape=[2, 2],
                       strides=[2, 2])
        else:
            scales = g.constant(f"{prefix}.scales", np.array([1, 1, 2, 2], np.float32))
            x = g.node("Resize", [x, "", scales], f"{prefix}.0", mode="linear",
                       coordinate_transformation_mode="half_pixel")
            x = g.conv(x, up[1], f"{prefix}.1", relu=False)
        skip = skips[level]
        if crops[level]:
            crop = crops[level]
            skip = g.node("Slice", [skip, g.constant(f"crop{level}_start",
                                                     np.array([crop, crop], np.int64)),
                                    g.constant(f"crop{level}_end",
                                               np.array([-crop, -crop], np.int64)),
                                    spatial_axes],
                          f"skip{level}_cropped")
        x = g.node("Concat", [skip, x], f"join{level}", axis=1)
        prefix = f"decoders.{level}"
        x = g.conv(x, model.decoders[level].conv1, f"{prefix}.conv1", relu=True)
        x = g.conv(x, model.decoders[level].conv2, f"{prefix}.conv2", relu=True)

    if padding == "same":
        x = g.conv(x, model.head, "head", relu=False)
        g.node("Slice", [x, g.constant("hw_zero", np.zeros(2, np.int64)), hw, spatial_axes],
               "logits")
        out_hw = ["height", "width"]
    else:
        g.conv(x, model.head, "head", relu=False, name="logits")
        out_hw = ["out_height", "out_width"]

    graph = helper.make_graph(
        g.nodes, "tinyunet_unet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                       ["batch", config["in_channels"], "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", config["num_classes"], *out_hw])],
        g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="tinyunet",
                              producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets),
                              doc_string="A U-Net exported by tinyunet; see metadata_props.")
    helper.set_model_props(proto, {**model_metadata(model), "opset": str(opset)})
    return proto


def to_onnx(model, path, opset: int = DEFAULT_OPSET, overwrite: bool = False) -> Path:
    """Write ``model`` (a tinyunet ``UNet``) as an ONNX file; returns the path.

    The file passes ``onnx.checker`` (full check, shape inference included) before it is
    written. An existing file is replaced only with ``overwrite=True``.
    """
    onnx = require_onnx("Exporting to ONNX")
    proto = onnx_model(model, opset)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    _write_atomically(path, proto.SerializeToString(), overwrite)
    return path


# ---- safetensors ----------------------------------------------------------------------

def write_safetensors(path, tensors: dict, metadata: dict | None = None,
                      overwrite: bool = False) -> Path:
    """Write numpy arrays ``tensors`` (name -> array) and string ``metadata`` to ``path``."""
    path = Path(path)
    names = sorted(tensors)
    header, chunks, offset = {}, [], 0
    for name in names:
        array = np.asarray(tensors[name])
        dtype_name = next((key for key, dtype in SAFETENSORS_DTYPES.items()
                           if dtype == array.dtype.newbyteorder("<")), None)
        if dtype_name is None:
            raise ExportError(f"{path}: Expect: tensors of a safetensors dtype "
                              f"({', '.join(SAFETENSORS_DTYPES)}). Actual: '{name}' of "
                              f"dtype {array.dtype}.")
        data = np.ascontiguousarray(array, dtype=SAFETENSORS_DTYPES[dtype_name]).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ExportError(f"{path}: Expect: metadata of strings. Actual: {metadata!r}.")
        header = {"__metadata__": dict(metadata), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    # Spaces pad the header so that the arrays start 8-byte aligned (as the format's
    # own writer does); JSON ignores them.
    text += b" " * (-len(text) % 8)
    payload = len(text).to_bytes(8, "little") + text + b"".join(chunks)
    _write_atomically(path, payload, overwrite)
    return path


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ExportError naming it if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    size = path.stat().st_size

    def bad(reason):
        return ExportError(f"{path}: not a safetensors file, or a damaged one ({reason})")

    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        header_size = int.from_bytes(start, "little")
        if header_size > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise bad(f"a header of {header_size} bytes in a file of {size}")
        try:
            header = json.loads(file.read(header_size).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise bad(f"its header is not JSON: {error}") from error
        buffer = file.read()
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not a map of strings")
    tensors, ranges = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r}: its entry is not a JSON object")
        dtype_name = entry.get("dtype")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise bad(f"tensor {name!r}: dtype {dtype_name!r} is not one of "
                      f"{', '.join(SAFETENSORS_DTYPES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(v) is int for v in shape + offsets)):
            raise bad(f"tensor {name!r}: its shape or data_offsets are not lists of integers")
        shape, (begin, end) = tuple(shape), offsets
        expected = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != expected or begin < 0:
            raise bad(f"tensor {name!r} of shape {shape} and dtype {entry['dtype']} has "
                      f"byte range {begin}..{end}")
        ranges.append((begin, end, name))
        tensors[name] = (dtype, shape, begin)
    # The byte ranges must tile the data exactly: no gaps, no overlaps, nothing after.
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position != len(buffer):
        raise bad(f"the tensors cover {position} bytes of data, the file holds {len(buffer)}")
    arrays = {name: np.frombuffer(buffer, dtype, math.prod(shape), begin).reshape(shape)
              .astype(dtype.newbyteorder("="))
              for name, (dtype, shape, begin) in tensors.items()}
    return arrays, dict(metadata)


def to_safetensors(model, path, overwrite: bool = False) -> Path:
    """Write ``model``'s weights (float32, ``state_dict`` names) and ``model_metadata``."""
    state = {name: np.asarray(value, np.float32) for name, value in model.state_dict().items()}
    return write_safetensors(path, state, {"format": "pt", **model_metadata(model)}, overwrite)


def from_safetensors(path, backend=None):
    """The tinyunet ``UNet`` held in a safetensors file, in eval mode.

    The file's ``__metadata__`` must hold ``tinyunet_config`` (the U-Net's constructor
    arguments as JSON), as ``to_safetensors`` writes it; weights of another dtype are
    cast to float32.
    """
    from .backends import get_backend
    from .errors import ShapeError
    from .nn import UNet

    tensors, metadata = read_safetensors(path)
    text = metadata.get("tinyunet_config")
    if text is None:
        raise ExportError(f"{path}: no 'tinyunet_config' in its metadata, so the U-Net it "
                          "holds is unknown (files written by `tinyunet export` have it)")
    try:
        config = json.loads(text)
        model = UNet(**config)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ExportError(f"{path}: its 'tinyunet_config' is unusable "
                          f"({type(error).__name__}: {error})") from error
    try:
        model.load_state_dict(tensors)
    except ShapeError as error:
        raise ExportError(f"{path}: its tensors do not fit the U-Net of its config: "
                          f"{error}") from error
    if backend is not None:
        model.to(get_backend(backend))
    return model.eval()


# ---- from a checkpoint, for the command line ------------------------------------------

def export_format(path, format: str | None) -> str:
    """``format`` checked, or the format that ``path``'s suffix names."""
    if format is None:
        format = SUFFIXES.get(Path(path).suffix.lower())
        if format is None:
            raise ExportError(f"{path}: Expect: a format, or a file name ending in "
                              f"{' or '.join(SUFFIXES)}. Actual: suffix "
                              f"'{Path(path).suffix}'.")
    if format not in EXPORT_FORMATS:
        raise ExportError(f"export: Expect: format {' or '.join(EXPORT_FORMATS)}. "
                          f"Actual: {format!r}.")
    return format


def export_checkpoint(checkpoint, out, format: str | None = None,
                      opset: int = DEFAULT_OPSET, overwrite: bool = False) -> str:
    """Export the U-Net of a tinyunet checkpoint to ``out``; returns the format used."""
    from .checkpoint import load_model

    format = export_format(out, format)
    if format == "onnx":
        require_onnx("Exporting to ONNX")  # before the checkpoint is read
    model, _ = load_model(checkpoint, backend="numpy")
    if format == "onnx":
        to_onnx(model, out, opset, overwrite)
    else:
        to_safetensors(model, out, overwrite)
    return format
