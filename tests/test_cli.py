"""The `vit-fast` command and the installed package's layout."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest


def _vit_fast_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "vit-fast")
    if not os.path.exists(exe):
        pytest.fail(f"the vit-fast console script is not installed beside {sys.executable}")
    return exe


@pytest.mark.subprocess
def test_info_prints_versions_devices_and_backend_table():
    out = subprocess.run([_vit_fast_exe(), "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("vit_fast", "torch", "triton", "CUDA", "devices:", "cpu", "attention", "layernorm_mlp",
                   "patch_embed", "layer_norm", "reference", "<- picked"):
        assert needle in text, needle


@pytest.mark.subprocess
def test_info_for_another_dtype_and_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "vit_fast.cli", "info", "--dtype", "float64", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "dtype float64 not supported" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vit_fast.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_kernels_are_installed_under_the_vit_fast_namespace():
    import vit_fast.kernels

    assert os.path.basename(os.path.dirname(vit_fast.kernels.__file__)) == "kernels"
    assert vit_fast.kernels.__name__ == "vit_fast.kernels"
    # a top-level "kernels" module, if importable at all, is not ours: installs never put one there (the wheel
    # check in .ci/run), and conftest takes the source root off sys.path (python -m pytest from the root)
    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin != vit_fast.kernels.__file__


def test_a_user_error_from_a_key_error_prints_its_message_unquoted(monkeypatch, capsys):
    """str() of a KeyError is the repr of its argument; the line a user reads is the message itself."""
    import argparse
    import types

    from vit_fast import cli

    command = next(c for c in cli.COMMANDS if KeyError in c.errors)

    def fails(args):
        raise KeyError("checkpoint lacks blocks.0.attn.qkv.weight")

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: types.SimpleNamespace(**{command.run: fails}))
    assert cli._runner(command)(argparse.Namespace()) == command.status
    assert capsys.readouterr().err == f"vit-fast {command.name}: error: checkpoint lacks blocks.0.attn.qkv.weight\n"
