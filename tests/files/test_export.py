"""ONNX and safetensors export, checked by the programs that load the files.

The ONNX tests run the exported file in ONNX Runtime and compare it with tinyunet's own
forward to float32 rounding: rtol 1e-4, atol 1e-5 (the logits here are of order 1; the
largest difference seen is about 1e-6 of the largest logit). They skip, saying why,
when onnx or onnxruntime is not installed. The safetensors tests need numpy only; the
cross-checks with the `safetensors` package and with a PyTorch U-Net skip without those.
"""

import importlib
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

import tinyunet as tu
from tinyunet import cli
from tinyunet.checkpoint import save_checkpoint
from tinyunet.data.tiling import predict_logits
from tinyunet.export import (
    DEFAULT_OPSET,
    ExportError,
    export_checkpoint,
    from_safetensors,
    read_safetensors,
    to_safetensors,
    write_safetensors,
)
from tinyunet.nn import UNet


def importable(*names):
    try:
        for name in names:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


HAVE_ONNX = importable("onnx", "onnxruntime")
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX, reason="onnx and onnxruntime are not installed: pip install "
    "'tinyunet[export]'")
needs_safetensors = pytest.mark.skipif(
    not importable("safetensors.numpy"),
    reason="the safetensors package (the format's reference reader) is not installed")
needs_torch = pytest.mark.skipif(
    not importable("torch", "safetensors.torch"),
    reason="PyTorch and the safetensors package are optional peers; not both installed")
RTOL, ATOL = 1e-4, 1e-5


def make_unet(padding="same", up="transpose", depth=2, num_classes=1, in_channels=1,
              base_channels=3, seed=0):
    tu.manual_seed(seed)
    model = UNet(in_channels=in_channels, num_classes=num_classes, depth=depth,
                 base_channels=base_channels, padding=padding, up=up)
    # Zero biases (He init) would leave the bias paths untested.
    rng = np.random.default_rng(seed)
    model.load_state_dict({name: value + (0.1 * rng.standard_normal(value.shape)
                                          if name.endswith("bias") else 0)
                           for name, value in model.state_dict().items()})
    return model.to("numpy").eval()


def forward(model, x):
    with tu.no_grad():
        return model(tu.tensor(x, backend=model.encoders[0].conv1.weight.backend)).numpy()


def sizes_for(model, count=2):
    """Input sizes to try: odd and off-grid in 'same', the usable grid in 'valid'."""
    if model.config["padding"] == "same":
        return [(37, 45), (16, 16), (1, 70)][:count + 1]
    return [model.valid_input_hw((40, 40)), model.valid_input_hw((70, 45))][:count]


def images(hw, batch=2, channels=1, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, channels, *hw)).astype(np.float32)


# ---- ONNX ----------------------------------------------------------------------------

def onnx_session(path_or_bytes):
    import onnxruntime

    return onnxruntime.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])


VARIANTS = [dict(padding=p, up=u, num_classes=k, depth=d, in_channels=c)
            for (p, u, k), (d, c) in zip(
                itertools.product(("same", "valid"), ("transpose", "upsample"), (1, 3)),
                itertools.cycle([(1, 1), (2, 3), (3, 1), (2, 2)]))]


@needs_onnx
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_onnx_runtime_matches_our_forward(tmp_path, variant):
    import onnx

    from tinyunet.export import to_onnx

    model = make_unet(**variant)
    path = to_onnx(model, tmp_path / "model.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    session = onnx_session(str(path))
    # One session serves every batch and spatial size: both are dynamic.
    for batch, hw in zip((2, 1, 3), sizes_for(model), strict=False):
        x = images(hw, batch, variant["in_channels"])
        ours = forward(model, x)
        theirs = session.run(None, {"image": x})[0]
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(theirs, ours, rtol=RTOL, atol=ATOL)


@needs_onnx
def test_onnx_matches_every_backend(backend):
    from tinyunet.export import onnx_model

    model = make_unet("same", "upsample", depth=1, base_channels=2, num_classes=2)
    session = onnx_session(onnx_model(model).SerializeToString())
    x = images((12, 10), batch=1)
    theirs = session.run(None, {"image": x})[0]
    np.testing.assert_allclose(theirs, forward(model.to(backend), x), rtol=RTOL, atol=ATOL)


@needs_onnx
@pytest.mark.parametrize("opset", [13, DEFAULT_OPSET, 21])
def test_supported_opsets(opset):
    from tinyunet.export import onnx_model

    model = make_unet("same", "upsample", depth=2)
    proto = onnx_model(model, opset=opset)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", opset)]
    x = images((20, 27))
    np.testing.assert_allclose(onnx_session(proto.SerializeToString()).run(None, {"image": x})[0],
                               forward(model, x), rtol=RTOL, atol=ATOL)


@needs_onnx
@pytest.mark.parametrize("opset", [12, 10**6, "17"])
def test_unsupported_opset_is_one_clear_error(opset):
    from tinyunet.export import onnx_model

    with pytest.raises(ExportError, match=r"to_onnx: Expect: an opset from 13 to \d+"):
        onnx_model(make_unet(), opset=opset)


@needs_onnx
@pytest.mark.parametrize("mode", ["align_corners", "asymmetric"])
def test_resize_mode_matters(mode):
    """The parity check would catch another bilinear convention than half_pixel."""
    from tinyunet.export import onnx_model

    model = make_unet("same", "upsample", depth=2)
    proto = onnx_model(model)
    for node in proto.graph.node:
        if node.op_type == "Resize":
            for attribute in node.attribute:
                if attribute.name == "coordinate_transformation_mode":
                    attribute.s = mode.encode()
    x = images((16, 16))
    theirs = onnx_session(proto.SerializeToString()).run(None, {"image": x})[0]
    assert np.abs(theirs - forward(model, x)).max() > 1e-3


@needs_onnx
@pytest.mark.parametrize("classes, activation", [(1, "sigmoid"), (4, "softmax")])
def test_onnx_metadata_states_the_conventions(tmp_path, classes, activation):
    import onnx

    from tinyunet.export import to_onnx

    model = make_unet("valid", num_classes=classes)
    proto = onnx.load(str(to_onnx(model, tmp_path / "m.onnx")))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["tinyunet_config"]) == model.config
    assert props["output_activation"] == activation
    assert json.loads(props["normalization"]) == {
        "kind": "percentile", "low": 1.0, "high": 99.8,
        "axes": "per image and channel, over H and W", "clip": False}
    assert props["opset"] == str(DEFAULT_OPSET) and proto.opset_import[0].version == 17
    assert proto.producer_name == "tinyunet"
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (proto.graph.input[0], proto.graph.output[0])]
    assert dims == [["batch", 1, "height", "width"], ["batch", classes, "out_height",
                                                      "out_width"]]
    # The initialisers carry state_dict's names.
    names = {i.name for i in proto.graph.initializer}
    assert set(model.state_dict()) <= names


@needs_onnx
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_tiled_prediction_through_onnx_runtime(tmp_path, padding):
    from tinyunet.export import to_onnx
    from tinyunet.onnx_runtime import OnnxModel

    model = make_unet(padding, num_classes=2)
    onnx_model = OnnxModel(to_onnx(model, tmp_path / "m.onnx"), threads=1)
    assert onnx_model.config == model.config
    assert onnx_model.valid_input_hw((50, 61)) == model.valid_input_hw((50, 61))
    image = np.random.default_rng(3).normal(size=(1, 150, 141)).astype(np.float32)
    ours = predict_logits(model, image, tile=80, halo=32 if padding == "same" else None)
    theirs = predict_logits(onnx_model, image, tile=80,
                            halo=32 if padding == "same" else None)
    assert theirs.shape == ours.shape == (2, 150, 141)
    np.testing.assert_allclose(theirs, ours, rtol=RTOL, atol=ATOL)


@needs_onnx
def test_onnx_model_refuses_files_it_cannot_use(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from tinyunet.onnx_runtime import OnnxModel

    with pytest.raises(ExportError, match="missing.onnx: no such ONNX file"):
        OnnxModel(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="garbage.onnx: ONNX Runtime cannot load it"):
        OnnxModel(garbage)
    # A valid ONNX model that tinyunet did not write: no config for the tiling.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), other)
    with pytest.raises(ExportError, match="other.onnx: not a U-Net exported by tinyunet"):
        OnnxModel(other)


def test_missing_onnx_names_the_install_command(monkeypatch, tmp_path):
    from tinyunet.export import to_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(ImportError, match=r"pip install 'tinyunet\[export\]'"):
        to_onnx(make_unet(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnxruntime_names_the_install_command(monkeypatch, tmp_path):
    from tinyunet.onnx_runtime import OnnxModel

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"onnxruntime .*pip install 'tinyunet\[export\]'"):
        OnnxModel(tmp_path / "m.onnx")


# ---- safetensors ---------------------------------------------------------------------

@pytest.mark.parametrize("padding, up", [("same", "transpose"), ("valid", "upsample")])
def test_safetensors_round_trip_is_bit_exact(tmp_path, padding, up):
    model = make_unet(padding, up, num_classes=3)
    path = to_safetensors(model, tmp_path / "m.safetensors")
    loaded = from_safetensors(path, backend="numpy")
    assert loaded.config == model.config
    for (name, ours), (name2, theirs) in zip(model.state_dict().items(),
                                             loaded.state_dict().items(), strict=True):
        assert name == name2 and ours.dtype == theirs.dtype == np.float32
        assert np.array_equal(ours, theirs)
    x = images(sizes_for(model)[0])
    assert np.array_equal(forward(loaded, x), forward(model, x))
    _, metadata = read_safetensors(path)
    assert metadata["format"] == "pt" and metadata["output_activation"] == "softmax"


def test_safetensors_file_layout(tmp_path):
    """The bytes as the format defines them: header length, JSON header, aligned data."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, -2], dtype=">i8")  # big-endian in, little-endian in the file
    path = write_safetensors(tmp_path / "t.safetensors", {"b": b, "a": a}, {"k": "v"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert (8 + n) % 8 == 0
    assert header == {"__metadata__": {"k": "v"},
                      "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                      "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
    assert data[8 + n :] == a.astype("<f4").tobytes() + b.astype("<i8").tobytes()
    tensors, metadata = read_safetensors(path)
    assert metadata == {"k": "v"} and tensors["b"].tolist() == [1, -2]


DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8",
          "uint16", "uint32", "uint64", "bool"]


def sample_tensors():
    rng = np.random.default_rng(0)
    tensors = {f"t_{d}": (rng.standard_normal((3, 2, 2)) * 50).astype(d) for d in DTYPES}
    tensors["scalar"] = np.array(2.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    return tensors


@needs_safetensors
def test_the_safetensors_package_reads_our_files(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = sample_tensors()
    path = write_safetensors(tmp_path / "ours.safetensors", tensors, {"note": "ours"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array)
    with safe_open(str(path), framework="numpy") as file:
        assert file.metadata() == {"note": "ours"}


@needs_safetensors
def test_we_read_the_safetensors_packages_files(tmp_path):
    from safetensors.numpy import save_file

    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"note": "theirs"})
    loaded, metadata = read_safetensors(tmp_path / "theirs.safetensors")
    assert metadata == {"note": "theirs"} and set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array)
    # A U-Net's weights written by the package come back as that U-Net, bit for bit.
    model = make_unet("valid", "upsample")
    save_file(model.state_dict(), str(tmp_path / "unet.safetensors"),
              metadata={"tinyunet_config": json.dumps(model.config)})
    loaded_model = from_safetensors(tmp_path / "unet.safetensors")
    for name, value in model.state_dict().items():
        assert np.array_equal(loaded_model.state_dict()[name], value)


def damaged_files(tmp_path):
    """(name, bytes, words of the error) of files that are not usable safetensors."""
    good = write_safetensors(tmp_path / "good.safetensors",
                             {"a": np.ones(4, np.float32), "b": np.ones(2, np.float32)}
                             ).read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])

    def with_header(change):
        edited = json.loads(json.dumps(header))
        change(edited)
        text = json.dumps(edited).encode()
        return len(text).to_bytes(8, "little") + text + good[8 + n :]

    return [
        ("short", good[:5], "shorter than the 8-byte header length"),
        ("huge_header", (10**12).to_bytes(8, "little") + good[8:], "a header of"),
        ("not_json", len(b"{nope").to_bytes(8, "little") + b"{nope", "header is not JSON"),
        ("truncated", good[:-4], "the tensors cover 24 bytes of data, the file holds 20"),
        ("bf16", with_header(lambda h: h["a"].update(dtype="BF16")), "dtype 'BF16'"),
        ("overlap", with_header(lambda h: h["b"].update(data_offsets=[8, 16])),
         "starts at byte 8, expected 16"),
        ("shape", with_header(lambda h: h["a"].update(shape=[5])), "has byte range"),
        ("offsets", with_header(lambda h: h["a"].update(data_offsets="0-16")),
         "not lists of integers"),
        ("metadata", with_header(lambda h: h.update(__metadata__={"k": 1})),
         "not a map of strings"),
    ]


def test_damaged_safetensors_files_are_one_clear_error(tmp_path):
    for name, data, words in damaged_files(tmp_path):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ExportError) as error:
            read_safetensors(path)
        message = str(error.value)
        assert message.startswith(f"{path}: not a safetensors file") and words in message, name
    with pytest.raises(ExportError, match="missing.safetensors: no such file"):
        read_safetensors(tmp_path / "missing.safetensors")


def test_safetensors_without_a_tinyunet_config(tmp_path):
    model = make_unet()
    path = write_safetensors(tmp_path / "plain.safetensors", model.state_dict())
    with pytest.raises(ExportError, match="plain.safetensors: no 'tinyunet_config'"):
        from_safetensors(path)
    config = dict(model.config, depth=3)  # weights of depth 2
    write_safetensors(path, model.state_dict(), {"tinyunet_config": json.dumps(config)},
                      overwrite=True)
    with pytest.raises(ExportError, match="do not fit the U-Net of its config"):
        from_safetensors(path)


# ---- a PyTorch U-Net with the same module tree ---------------------------------------

def torch_unet(torch, config):
    """torch.nn U-Net whose state_dict names and shapes are tinyunet's UNet's."""
    nn = torch.nn
    pad = 1 if config["padding"] == "same" else 0
    widths = [config["base_channels"] * 2**level for level in range(config["depth"] + 1)]

    class DoubleConv(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=pad)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=pad)

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    class TorchUNet(nn.Module):
        def __init__(self):
            super().__init__()
            depth = config["depth"]
            self.encoders = nn.Sequential(*[
                DoubleConv(config["in_channels"] if level == 0 else widths[level - 1],
                           widths[level]) for level in range(depth + 1)])
            self.ups = nn.Sequential(*[
                nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
                if config["up"] == "transpose" else
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                              nn.Conv2d(widths[level + 1], widths[level], 1))
                for level in range(depth)])
            self.decoders = nn.Sequential(*[DoubleConv(2 * widths[level], widths[level])
                                            for level in range(depth)])
            self.head = nn.Conv2d(widths[0], config["num_classes"], 1)

        def forward(self, x):
            height, width = x.shape[2:]
            align = 2 ** config["depth"]
            if pad:
                x = nn.functional.pad(x, (0, -width % align, 0, -height % align))
            skips = []
            for level, encoder in enumerate(self.encoders):
                x = encoder(x)
                if level < config["depth"]:
                    skips.append(x)
                    x = nn.functional.max_pool2d(x, 2)
            for level in reversed(range(config["depth"])):
                x = self.ups[level](x)
                skip = skips[level]
                top = (skip.shape[2] - x.shape[2]) // 2
                left = (skip.shape[3] - x.shape[3]) // 2
                skip = skip[:, :, top : top + x.shape[2], left : left + x.shape[3]]
                x = self.decoders[level](torch.cat([skip, x], dim=1))
            logits = self.head(x)
            return logits[:, :, :height, :width] if pad else logits

    return TorchUNet()


@needs_torch
@pytest.mark.parametrize("padding, up", [("same", "transpose"), ("same", "upsample"),
                                         ("valid", "transpose"), ("valid", "upsample")])
def test_pytorch_loads_the_safetensors_file(tmp_path, padding, up):
    import torch
    from safetensors.torch import load_file

    model = make_unet(padding, up, num_classes=2, in_channels=2)
    path = to_safetensors(model, tmp_path / "m.safetensors")
    theirs = torch_unet(torch, model.config)
    theirs.load_state_dict(load_file(str(path)))  # strict: every name and shape fits
    x = images(sizes_for(model)[0], channels=2)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(forward(model, x), expected, rtol=RTOL, atol=ATOL)


@needs_torch
def test_a_pytorch_trained_unet_comes_into_tinyunet(tmp_path):
    import torch
    from safetensors.torch import save_file

    config = dict(in_channels=1, num_classes=1, depth=2, base_channels=4, padding="same",
                  up="upsample")
    torch.manual_seed(0)
    theirs = torch_unet(torch, config)
    save_file(theirs.state_dict(), str(tmp_path / "torch.safetensors"),
              metadata={"tinyunet_config": json.dumps(config)})
    ours = from_safetensors(tmp_path / "torch.safetensors")
    x = images((23, 30))
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(forward(ours, x), expected, rtol=RTOL, atol=ATOL)


# ---- the command line ----------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "best.npz"
    save_checkpoint(path, make_unet("same", "upsample", depth=2, num_classes=1), meta={})
    return path


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_command_writes_both_formats(tmp_path, capsys, checkpoint):
    code, out, _ = run_cli(capsys, "export", "--checkpoint", checkpoint, "--format",
                           "safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 0 and "m.safetensors (safetensors)" in out
    assert from_safetensors(tmp_path / "m.safetensors").config["up"] == "upsample"
    if HAVE_ONNX:
        from tinyunet.onnx_runtime import OnnxModel

        # The format follows from the suffix when --format is left out.
        code, out, _ = run_cli(capsys, "export", "--checkpoint", checkpoint,
                               "--out", tmp_path / "m.onnx")
        assert code == 0 and "(onnx)" in out
        assert OnnxModel(tmp_path / "m.onnx").config["depth"] == 2


def test_export_refuses_to_overwrite(tmp_path, capsys, checkpoint):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "export", "--checkpoint", checkpoint, "--out", out)
    assert code == 2 and "m.safetensors: the file exists" in err and out.read_bytes() == b"keep me"
    assert run_cli(capsys, "export", "--checkpoint", checkpoint, "--out", out,
                   "--overwrite")[0] == 0
    assert from_safetensors(out).config["depth"] == 2


@pytest.mark.parametrize("case", ["not_a_checkpoint", "other_npz", "missing"])
def test_export_of_something_that_is_not_a_tinyunet_checkpoint(tmp_path, capsys, case):
    path = tmp_path / "weights.npz"
    if case == "not_a_checkpoint":
        path.write_bytes(b"hello")
    elif case == "other_npz":
        np.savez(path, w=np.ones(3))
    code, _, err = run_cli(capsys, "export", "--checkpoint", path, "--out",
                           tmp_path / "m.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"tinyunet: error: {path}: ")
    assert not (tmp_path / "m.safetensors").exists()


def test_export_with_an_unknown_format(tmp_path, capsys, checkpoint):
    code, _, err = run_cli(capsys, "export", "--checkpoint", checkpoint,
                           "--out", tmp_path / "m.tflite")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "m.tflite: Expect: a format, or a file name ending in .onnx or .safetensors" in err
    with pytest.raises(SystemExit) as exit_:  # argparse's choices
        cli.main(["export", "--checkpoint", str(checkpoint), "--format", "tflite",
                  "--out", str(tmp_path / "m.x")])
    assert exit_.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="export: Expect: format onnx or safetensors"):
        export_checkpoint(checkpoint, tmp_path / "m.onnx", format="tflite")


def blocked_import_main(module, *args):
    """cli.main run in a fresh process in which ``import module`` fails."""
    code = (f"import sys; sys.modules[{module!r}] = None; from tinyunet.cli import main; "
            f"sys.exit(main({[str(a) for a in args]!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_export_without_the_extra_is_one_line_naming_the_command(tmp_path, checkpoint):
    done = blocked_import_main("onnx", "export", "--checkpoint", checkpoint, "--out",
                               tmp_path / "m.onnx")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "tinyunet: error: Exporting to ONNX needs the onnx package, which is not installed. "
        "Install it with: pip install 'tinyunet[export]'"]


@needs_onnx
def test_predict_with_an_onnx_model(tmp_path, capsys, checkpoint):
    Image = pytest.importorskip("PIL.Image")
    image = (np.random.default_rng(0).random((100, 90)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "cells.png")
    assert run_cli(capsys, "export", "--checkpoint", checkpoint, "--out",
                   tmp_path / "m.onnx")[0] == 0
    runs = {"onnx": ["--model", tmp_path / "m.onnx"],
            "ours": ["--checkpoint", checkpoint, "--backend", "numpy"]}
    for name, model_args in runs.items():
        code, out, err = run_cli(capsys, "predict", *model_args, "--out", tmp_path / name,
                               "--probabilities", "--tile", "80", tmp_path / "cells.png")
        assert code == 0 and "cells_mask.png" in out, err
    onnx_prob = np.load(tmp_path / "onnx" / "cells_prob.npy")
    ours_prob = np.load(tmp_path / "ours" / "cells_prob.npy")
    np.testing.assert_allclose(onnx_prob, ours_prob, rtol=RTOL, atol=ATOL)
    with Image.open(tmp_path / "onnx" / "cells_mask.png") as a, \
            Image.open(tmp_path / "ours" / "cells_mask.png") as b:
        differ = np.asarray(a) != np.asarray(b)
    # Masks agree wherever the probability is not a rounding error away from 0.5.
    assert not (differ & (np.abs(ours_prob[0] - 0.5) > 1e-4)).any()

    with pytest.raises(SystemExit):  # exactly one of --checkpoint and --model
        cli.main(["predict", "--checkpoint", str(checkpoint), "--model",
                  str(tmp_path / "m.onnx"), "--out", str(tmp_path), str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "predict", "--model", tmp_path / "m.onnx", "--backend",
                           "numba", "--out", tmp_path / "x", tmp_path / "cells.png")
    assert code == 2 and "--backend numba: applies to --checkpoint" in err
    code, _, err = run_cli(capsys, "predict", "--model", checkpoint, "--out", tmp_path / "x",
                           tmp_path / "cells.png")
    assert code == 2 and f"{checkpoint}: ONNX Runtime cannot load it" in err
    assert len(err.strip().splitlines()) == 1


def test_predict_without_onnxruntime_names_the_command(tmp_path):
    done = blocked_import_main("onnxruntime", "predict", "--model", tmp_path / "m.onnx",
                               "--out", tmp_path / "x", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tinyunet: error: Running an ONNX model needs the onnxruntime package, which is not "
        "installed. Install it with: pip install 'tinyunet[export]'"]
