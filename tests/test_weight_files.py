"""Every weights loader, fed broken files: truncated, bit-flipped and wrong-type ``.safetensors``, ``.pth``/
``.pt``/``.bin`` and model directories (config.json + model.safetensors). Each either loads or raises a clear
error (``ValueError``, ``KeyError`` or ``FileNotFoundError``) that names the file; none runs code from the file
(``torch.load(weights_only=True)`` everywhere)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import vit_fast
from vit_fast.weights import read_state_dict

CLEAR = (ValueError, KeyError, FileNotFoundError)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Byte offsets to flip: the headers at either end (safetensors' JSON header, a zip's local headers and its central
# directory) as often as anywhere, since most of a file is tensor data, where a flip is only a different number.
POSITIONS = st.one_of(st.integers(0, 1023), st.integers(-1024, -1), st.integers(0, 2**31))
CONFIG = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3)


def _model() -> vit_fast.VisionTransformer:
    return vit_fast.create_model("vit_tiny_patch16_224", **CONFIG)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one valid file of each kind (and a model directory's two files)."""
    folder = tmp_path_factory.mktemp("valid")
    sd = _model().state_dict()
    save_file(sd, str(folder / "w.safetensors"))
    torch.save({"state_dict": sd, "epoch": 1}, folder / "w.pth")
    _model().save_pretrained(str(folder / "dir"))
    return {
        ".safetensors": (folder / "w.safetensors").read_bytes(),
        ".pth": (folder / "w.pth").read_bytes(),
        "config.json": (folder / "dir" / "config.json").read_bytes(),
        "model.safetensors": (folder / "dir" / "model.safetensors").read_bytes(),
    }


def _assert_loads_or_names(path: Path, load) -> None:
    """``load()`` returns, or raises one of the clear errors with ``path``'s name in its message."""
    try:
        load()
    except CLEAR as e:
        assert path.name in str(e), f"{type(e).__name__} does not name {path.name}: {e}"


def _flip(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    out = bytearray(data)
    for pos, bit in zip(positions, bits, strict=False):
        out[pos % len(out)] ^= 1 << bit
    return bytes(out)


def _load_file(path: Path):
    return lambda: vit_fast.load_checkpoint(_model(), path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_truncated_checkpoints(valid_files, suffix, cut):
    data = valid_files[suffix]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"weights{suffix}"
        path.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(CLEAR) as info:  # a truncated file never loads
            vit_fast.load_checkpoint(_model(), path)
        assert path.name in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@FUZZ
@given(positions=st.lists(POSITIONS, min_size=1, max_size=8), bits=st.lists(st.integers(0, 7), min_size=8, max_size=8))
def test_bit_flipped_checkpoints(valid_files, suffix, positions, bits):
    """A flip in the tensor data loads (no format can tell); one in the structure is a clear error."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"weights{suffix}"
        path.write_bytes(_flip(valid_files[suffix], positions, bits))
        _assert_loads_or_names(path, _load_file(path))


@pytest.mark.parametrize("which", ["config.json", "model.safetensors"])
@FUZZ
@given(cut=st.one_of(st.none(), st.floats(0.0, 0.999)), positions=st.lists(POSITIONS, max_size=6),
       bits=st.lists(st.integers(0, 7), min_size=6, max_size=6))
def test_broken_model_directories(valid_files, which, cut, positions, bits):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_bytes(valid_files[name])
        data = valid_files[which] if cut is None else valid_files[which][: int(len(valid_files[which]) * cut)]
        (folder / which).write_bytes(_flip(data, positions, bits) if data else data)
        _assert_loads_or_names(folder / which, lambda: vit_fast.from_pretrained(folder))


class _Payload:
    """Unpickling this object would create ``marker``: a file that proves code from the checkpoint ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("name", ["evil.pth", "evil.bin", "model_dir"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(name, tmp_path):
    marker = tmp_path / "code-ran"
    payload = {"state_dict": {"cls_token": torch.zeros(1, 1, 16)}, "extra": _Payload(str(marker))}
    if name == "model_dir":
        _model().save_pretrained(str(tmp_path / "model_dir"))
        (tmp_path / "model_dir" / "model.safetensors").unlink()
        target = tmp_path / "model_dir" / "pytorch_model.bin"  # timm's second choice of weights file
        torch.save(payload, target)
        load = lambda: vit_fast.from_pretrained(tmp_path / "model_dir")  # noqa: E731
    else:
        target = tmp_path / name
        torch.save(payload, target)
        load = _load_file(target)
    with pytest.raises(ValueError, match=target.name) as info:
        load()
    assert "weights_only=True" in str(info.value)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # a bare pickle (torch's legacy format), not a zip
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="raw.pt"):
        read_state_dict(raw)
    assert not marker.exists()


def _png() -> bytes:
    return bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8"
                         "cfc0f01f0005000201ffa0f2a5ee0000000049454e44ae426082")


WRONG_TYPES = {
    "empty": b"",
    "json": json.dumps({"cls_token": [1, 2, 3]}).encode(),
    "png": _png(),
    "text": b"not a checkpoint\n" * 10,
    "zip": None,  # a zip archive that is not torch's (filled in below)
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin"])
@pytest.mark.parametrize("kind", sorted(WRONG_TYPES))
def test_files_of_the_wrong_type_name_themselves(kind, suffix, tmp_path):
    path = tmp_path / f"weights{suffix}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    else:
        path.write_bytes(WRONG_TYPES[kind])
    with pytest.raises(ValueError, match=path.name):
        vit_fast.load_checkpoint(_model(), path)


@pytest.mark.parametrize("content,why", [
    (torch.zeros(3), "holds a Tensor"),
    ([torch.zeros(3)], "holds a list"),
    ({"epoch": 3, "lr": 0.1}, "no state dict of tensors"),
    ({1: torch.zeros(3)}, "no state dict of tensors"),
    ({"state_dict": {"cls_token": "a string"}}, "no state dict of tensors"),
])
def test_pickled_containers_without_a_state_dict(content, why, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"odd.pth.*{why}|{why}.*odd.pth"):
        vit_fast.load_checkpoint(_model(), path)


def test_tensors_of_a_type_the_model_cannot_take_name_the_file(tmp_path):
    sd = {k: v.to(torch.complex64) if k == "blocks.0.norm1.weight" else v for k, v in _model().state_dict().items()}
    torch.save(sd, tmp_path / "complex.pt")
    with pytest.raises(ValueError, match="complex.pt"):
        vit_fast.load_checkpoint(_model(), tmp_path / "complex.pt")
    int_sd = {k: v.to(torch.int32) for k, v in _model().state_dict().items()}
    torch.save(int_sd, tmp_path / "ints.pt")
    folder = tmp_path / "dir"
    _model().save_pretrained(str(folder))
    save_file(int_sd, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors"):
        vit_fast.from_pretrained(folder)


@pytest.mark.parametrize("config,why", [
    ("[1, 2]", "not an object"),
    ("{}", "no architecture"),
    ('{"architecture": "vit_tiny_patch16_224", "model_args": {"depth": "two"}}', "depth"),
    ('{"architecture": "vit_tiny_patch16_224", "model_args": {"img_size": []}}', "img_size is"),
    ('{"architecture": "vit_tiny_patch16_224", "model_args": {"num_heads": 0}}', "ZeroDivisionError"),
    ('{"architecture": "vit_tiny_patch16_224", "model_args": {"init_values": 0.1}}', "init_values"),
    ('{"architecture": "vit_tiny_patch16_224", "num_classes": "3"}', "num_classes is"),
    ('{"architecture": "vit_tiny_patch16_224", "model_args": [1]}', "model_args"),
    ('{"vit_fast": {"config": {"depth": -1}}}', "depth"),
    ('{"architecture": "vit_tiny_patch16_224", "pretrained_cfg": 3}', "pretrained_cfg"),
    ("\xff\xfe not utf-8", "not a readable JSON file"),
])
def test_bad_configs_name_config_json(config, why, tmp_path):
    _model().save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_bytes(config.encode("latin-1"))
    with pytest.raises(ValueError, match=f"config.json.*({why})"):
        vit_fast.from_pretrained(tmp_path)


def test_missing_and_misplaced_files_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        vit_fast.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        vit_fast.from_pretrained(tmp_path)
    _model().save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        vit_fast.from_pretrained(tmp_path / "m")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"d\.safetensors is a directory"):
        vit_fast.load_checkpoint(_model(), tmp_path / "d.safetensors")
