"""Lowering Triton kernels to sm_90 machine code on a machine without a GPU (shared by the kernel tests)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest


def compile_for_sm90(script: str, which: str) -> None:
    """Run ``script`` (which compiles kernels with the NVIDIA backend and prints "compiled") in a fresh process
    without the interpreter: it catches type and lowering errors that the interpreter lets through."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script, which], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]
