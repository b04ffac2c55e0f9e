"""Test setup: with no GPU, Triton kernels run on CPU through the interpreter, so a plain ``pytest`` needs
no flags. TRITON_INTERPRET must be set before triton (and vit_fast) is imported."""

import os
import sys
from pathlib import Path

import torch

# The source root holds kernels/, installed as vit_fast.kernels: on sys.path (python -m pytest from the root) it
# would shadow the PyPI package "kernels" that transformers imports. vit_fast itself comes from the install.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# The suites live in folders (ops/, suites/); what they share lives in support/ and is imported by module name.
sys.path.insert(0, str(Path(__file__).parent / "support"))
sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VIT_FAST_AUTOTUNE", "0")  # fixed kernel configs: tests time nothing and run one config

import importlib.util  # noqa: E402

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and importlib.util.find_spec("triton"):
    import interpreter_bf16

    interpreter_bf16.install()  # bf16 tl.dot on CPU computes on values, so bf16 kernel numerics test on CPU


def pytest_configure(config):
    """Hypothesis draws from one seed per run: ``$VIT_FAST_HYPOTHESIS_SEED`` where it is set (CI sets it, so a run
    reproduces), else a fresh one (local runs keep exploring). The header prints it, so a failure replays with
    ``VIT_FAST_HYPOTHESIS_SEED=<seed> pytest ...``. An explicit ``--hypothesis-seed`` wins."""
    if config.getoption("hypothesis_seed", None) is not None:
        return
    from hypothesis import core

    chosen = os.environ.get("VIT_FAST_HYPOTHESIS_SEED", "").strip()
    try:
        seed = int(chosen) if chosen else int.from_bytes(os.urandom(4), "little")
    except ValueError:
        raise pytest.UsageError(f"VIT_FAST_HYPOTHESIS_SEED must be an integer; got {chosen!r}") from None
    core.global_force_seed = seed
    config.stash[_HYPOTHESIS_SEED] = (seed, bool(chosen))


_HYPOTHESIS_SEED = pytest.StashKey[tuple[int, bool]]()


def pytest_report_header(config):
    if _HYPOTHESIS_SEED not in config.stash:
        return None
    seed, fixed = config.stash[_HYPOTHESIS_SEED]
    source = "from VIT_FAST_HYPOTHESIS_SEED" if fixed else "random"
    return f"hypothesis seed: {seed} ({source}; replay with VIT_FAST_HYPOTHESIS_SEED={seed})"


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
