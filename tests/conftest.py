"""Test setup: with no GPU, Triton kernels run on CPU through the interpreter, so a plain ``pytest`` needs
no flags. TRITON_INTERPRET must be set before triton (and vit_fast) is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed_and_backend():
    """Every test starts from backend 'auto' and a seed of its own (fresh inputs, reproducible)."""
    from vit_fast import backends

    previous = backends._current
    torch.manual_seed(int.from_bytes(os.urandom(2), "little") if os.environ.get("VIT_FAST_RANDOM_SEED") else 0)
    yield
    backends._current = previous


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
