"""Test setup: with no GPU, Triton kernels run on CPU through the interpreter, so a plain ``pytest`` needs
no flags. TRITON_INTERPRET must be set before triton (and vit_fast) is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VIT_FAST_AUTOTUNE", "0")  # fixed kernel configs: tests time nothing and run one config

import importlib.util  # noqa: E402

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and importlib.util.find_spec("triton"):
    import interpreter_bf16

    interpreter_bf16.install()  # bf16 tl.dot on CPU computes on values, so bf16 kernel numerics test on CPU


@pytest.fixture(autouse=True)
def _fresh_seed_and_backend():
    """Every test starts from backend 'auto' and a seed of its own (fresh inputs, reproducible); a test that
    calls set_backend without a ``with`` leaves nothing behind."""
    import vit_fast

    torch.manual_seed(int.from_bytes(os.urandom(2), "little") if os.environ.get("VIT_FAST_RANDOM_SEED") else 0)
    with vit_fast.set_backend("auto"):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: no CUDA device visible (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Launcher outputs start as NaN in tests, so an unwritten element fails its comparison."""
    import vit_fast.kernels as kernels

    kernels.POISON = True
    yield
    kernels.POISON = False
