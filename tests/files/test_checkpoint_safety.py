"""Untrusted checkpoints (issue 19, items 8 and 9): a crafted file is one clear
CheckpointError naming it, found before anything is allocated or decompressed; no
pickle is ever loaded; bit flips are caught."""

import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tinyunet import cli
from tinyunet.checkpoint import CheckpointError, load_model, read_checkpoint
from tinyunet.nn import UNet
from tinyunet.nn.unet import parameter_shapes
from tinyunet.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real checkpoint of a tiny run (numpy backend: no kernels to compile)."""
    out = tmp_path_factory.mktemp("good")
    config = TrainConfig(epochs=1, batch_size=4, depth=2, base_channels=4, crop=32,
                         synthetic_train=8, synthetic_val=2, synthetic_size=32,
                         backend="numpy", out=str(out))
    Trainer(config, log=lambda line: None, progress_stream=False).fit()
    return out / "last.npz"


def members(path):
    """(meta, arrays) of a checkpoint, read here without tinyunet's reader."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def craft(path, meta, arrays, meta_text=None):
    """A checkpoint with these members, written member by member (pickles allowed)."""
    text = json.dumps(meta) if meta_text is None else meta_text
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in {**arrays, "meta": np.array(text)}.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as file:
                np.lib.format.write_array(file, np.asanyarray(value), allow_pickle=True)
    return path


def changed(good, path, meta_changes=(), model_changes=(), **array_changes):
    meta, arrays = members(good)
    for keys, value in dict(meta_changes).items():
        target = meta
        for key in keys[:-1]:
            target = target[key]
        if value is KeyError:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    arrays.update(array_changes)
    return craft(path, meta, arrays)


def refused(path, call=load_model):
    with pytest.raises(CheckpointError) as error:
        call(path)
    message = str(error.value)
    assert str(path) in message, message
    return message


# ---- the architecture is checked against the weights before the model is built -----------

def test_parameter_shapes_are_the_unets():
    for config in (dict(in_channels=3, num_classes=1, depth=1, base_channels=2),
                   dict(in_channels=1, num_classes=4, depth=3, base_channels=5, up="upsample"),
                   dict(in_channels=2, num_classes=2, depth=2, base_channels=3,
                        padding="valid")):
        model = UNet(**config)
        expected = {name: value.shape for name, value in model.state_dict().items()}
        assert parameter_shapes(model.config) == expected


@pytest.mark.parametrize("change", [{"base_channels": 4096}, {"depth": 40},
                                    {"in_channels": 100000}, {"depth": 10**9}])
def test_a_crafted_architecture_is_refused_before_anything_is_allocated(good, tmp_path,
                                                                         change):
    meta, arrays = members(good)
    meta["model_config"].update(change)
    path = craft(tmp_path / "crafted.npz", meta, arrays)
    tracemalloc.start()
    try:
        message = refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # the real model would take gigabytes
    assert "weights" in message or "model_config" in message


def _deflated_zeros(archive, name, elements):
    """A member holding ``elements`` float32 zeros, deflated to a few hundred KiB."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=True) as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": "<f4", "fortran_order": False, "shape": (elements,)})
        chunk = bytes(1 << 20)
        for _ in range(elements * 4 // len(chunk)):
            file.write(chunk)


def test_only_expected_members_are_read(good, tmp_path):
    """A 64 MiB member the checkpoint does not need is never decompressed."""
    path = tmp_path / "padded.npz"
    path.write_bytes(good.read_bytes())
    with zipfile.ZipFile(path, "a") as archive:
        _deflated_zeros(archive, "junk.npy", 1 << 24)
    assert path.stat().st_size < (1 << 20)
    tracemalloc.start()
    try:
        model, _ = load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert model.config["base_channels"] == 4


def test_a_member_larger_than_its_shape_says_is_refused_unread(good, tmp_path):
    meta, arrays = members(good)
    del arrays["model/head.bias"]
    path = craft(tmp_path / "bomb.npz", meta, arrays)
    with zipfile.ZipFile(path, "a") as archive:
        _deflated_zeros(archive, "model/head.bias.npy", 1 << 24)
    tracemalloc.start()
    try:
        message = refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert "head.bias" in message


@pytest.mark.parametrize("header", [
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4,",  # cut short: EOF in a '('
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 1, 1), }}",
    b"not a dictionary at all",
])
def test_a_broken_array_header_is_one_clear_error(good, tmp_path, header):
    """One flipped bit of an .npy header can leave an unclosed bracket, which numpy's
    header parser reports as tokenize.TokenError, not ValueError."""
    meta, arrays = members(good)
    del arrays["model/head.weight"]
    path = craft(tmp_path / "header.npz", meta, arrays)
    text = header.ljust(118) + b"\n"  # magic (8) + length (2) + 118 = 128 bytes
    member = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(16)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model/head.weight.npy", member)
    assert "head.weight" in refused(path)


# ---- crafted metadata and weights ---------------------------------------------------------

SHAPE = (1, 4, 1, 1)  # head.weight of the fixture's binary depth-2 U-Net

CRAFTED = {
    "model_config without depth": dict(meta_changes={("model_config", "depth"): KeyError}),
    "model_config with an unknown key": dict(meta_changes={("model_config", "dropout"): 0.5}),
    "model_config depth as text": dict(meta_changes={("model_config", "depth"): "2"}),
    "model_config padding 'full'": dict(meta_changes={("model_config", "padding"): "full"}),
    "no model_config": dict(meta_changes={("model_config",): KeyError}),
    "epoch as text": dict(meta_changes={("epoch",): "one"}),
    "negative epoch": dict(meta_changes={("epoch",): -4}),
    "epoch true": dict(meta_changes={("epoch",): True}),
    "fractional epoch": dict(meta_changes={("epoch",): 1.5}),
    "config not a dict": dict(meta_changes={("config",): [1, 2]}),
    "version 2": dict(meta_changes={("version",): 2}),
    "NaN weights": {"model/head.weight": np.full(SHAPE, np.nan, np.float32)},
    "infinite weights": {"model/head.weight": np.full(SHAPE, np.inf, np.float32)},
    "integer weights": {"model/head.weight": np.ones(SHAPE, np.int64)},
    "text weights": {"model/head.weight": np.full(SHAPE, "a")},
    "weights of another shape": {"model/head.weight": np.ones((2, 4, 1, 1), np.float32)},
    "meta not text": {"meta": np.arange(3)},
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_checkpoints_are_one_clear_error(good, tmp_path, case):
    changes = dict(CRAFTED[case])
    path = tmp_path / "crafted.npz"
    if "meta" in changes:  # replace the meta member itself
        _, arrays = members(good)
        with zipfile.ZipFile(path, "w") as archive:
            for name, value in {**arrays, "meta": changes["meta"]}.items():
                with archive.open(f"{name}.npy", "w") as file:
                    np.lib.format.write_array(file, value)
    else:
        changed(good, path, **changes)
    refused(path)


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,
    '{"format": "tinyunet-checkpoint", "version": 1, "history": '
    + "[" * 100_000 + "]" * 100_000 + "}",
    '{"format": "tinyunet-checkpoint", "version": 1, "history": ' + "[" * 500 + "]" * 500 + "}",
    "not json",
])
def test_deep_or_broken_json_is_one_clear_error(good, tmp_path, text):
    _, arrays = members(good)
    refused(craft(tmp_path / "deep.npz", {}, arrays, meta_text=text))


RESUME_CRAFTED = {
    "config with an unknown key": {("config", "mystery"): 1},
    "config epochs as text": {("config", "epochs"): "ten"},
    "config depth of zero": {("config", "depth"): 0},
    "best epoch after the epoch": {("best_epoch",): 7},
    "no history": {("history",): KeyError},
    "no optimizer state": {("optimizer",): KeyError},
    "no rng state": {("rng_state",): KeyError},
    "best dice as text": {("best_dice",): "high"},
}


@pytest.mark.parametrize("case", sorted(RESUME_CRAFTED))
def test_resume_from_a_crafted_checkpoint_is_one_line(good, tmp_path, capsys, case):
    path = changed(good, tmp_path / "crafted.npz", meta_changes=RESUME_CRAFTED[case])
    code = cli.main(["train", "--resume", str(path), "--out", str(tmp_path / "run"),
                     "--backend", "numpy"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("tinyunet: error:") and error.count("\n") == 1, error
    assert "crafted.npz" in error


def test_evaluate_with_a_crafted_config_is_one_line(good, tmp_path, capsys):
    path = changed(good, tmp_path / "crafted.npz",
                   meta_changes={("config", "mystery"): 1})
    assert cli.main(["evaluate", "--checkpoint", str(path), "--backend", "numpy"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tinyunet: error:") and "crafted.npz" in error
    assert "mystery" in error


# ---- what held in the drill, kept --------------------------------------------------------

class Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("member", ["model/head.bias", "meta", "optim/", "junk"])
def test_no_pickle_is_ever_loaded(good, tmp_path, member):
    marker = tmp_path / "pickle-was-loaded"
    meta, arrays = members(good)
    if member == "optim/":  # an optimizer buffer the metadata names
        member = min(name for name in arrays if name.startswith("optim/"))
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(str(marker))
    path = tmp_path / "pickled.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in {**arrays, "meta": np.array(json.dumps(meta)),
                            member: payload}.items():
            with archive.open(f"{name}.npy", "w") as file:
                np.lib.format.write_array(file, value, allow_pickle=True)
    if member == "junk":  # a member nothing names is never read
        read_checkpoint(path)
    else:
        refused(path, read_checkpoint)
        refused(path)
    assert not marker.exists()


def test_bit_flips_are_caught_or_harmless(good, tmp_path):
    original = good.read_bytes()
    meta, arrays = members(good)
    path = tmp_path / "flipped.npz"
    positions = np.linspace(0, len(original) - 1, 300).astype(int)
    caught = 0
    for position in positions:
        data = bytearray(original)
        data[position] ^= 1 << int(position % 8)
        path.write_bytes(bytes(data))
        try:
            loaded_meta, loaded = read_checkpoint(path)
        except CheckpointError as error:
            assert "flipped.npz" in str(error)
            caught += 1
            continue
        # A flip in a field the reader ignores (a timestamp, a comment) changes nothing.
        assert loaded_meta == meta
        assert loaded.keys() == arrays.keys()
        for key in arrays:
            np.testing.assert_array_equal(loaded[key], arrays[key])
    assert caught > 250
