"""The kernel variants' machinery: forcing a variant, and the launch fallback on OutOfResources. Each variant's
numerics (the TMA-descriptor GEMM of layernorm_mlp with every epilogue, the TMA FP8 GEMM, the TMA attention forward,
the fused dK/dV/dQ attention backward) are in its op's file, tests/ops/test_<op>.py.

The interpreter runs descriptor loads and stores (tl.make_tensor_descriptor's host-side TensorDescriptor) as
gathers with zero padding, so their boxes, offsets and edge handling are checked here; what it cannot show is the
TMA hardware path itself (cp.async.bulk.tensor, mbarriers, the persistent schedule's overlap), which only the
sm_90 compiles of tests/suites/test_kernel_resources.py (PTX) and a GPU run see."""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
import vit_fast.kernels as kernels
from triton.runtime.errors import OutOfResources

gemm = importlib.import_module("vit_fast.kernels.gemm")
scaled_gemm = importlib.import_module("vit_fast.kernels.scaled_gemm")
attention = importlib.import_module("vit_fast.kernels.attention")

needs_interpreter = pytest.mark.skipif(not kernels.interpreting(), reason="kernel numerics on CPU run under the "
                                       "Triton interpreter (TRITON_INTERPRET=1)")
needs_tma = pytest.mark.skipif(kernels.tma_api_missing() is not None, reason=str(kernels.tma_api_missing()))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


def test_forcing_a_variant_that_cannot_run_raises_with_the_reason():
    with pytest.raises(ValueError, match="unknown kernel variant gemm='nope'"):
        with kernels.use_variant("gemm", "nope"):
            pass
    a = torch.randn(8, 24)  # fp32 operands: the pointer kernel's
    with kernels.use_variant("gemm", "tma"), pytest.raises(kernels.KernelLaunchError, match="fp32 operands"):
        gemm.gemm(a, torch.randn(24, 16), torch.empty(8, 16))
    odd = torch.randn(4, 3, 5, 2, 20)[..., :18].to(torch.float16)  # a row stride of 20 halves: not 16-byte aligned
    assert "16-byte" in kernels.tma_reason(odd[:, :, 0, 0]) or kernels.tma_device_reason(odd.device)


def test_forced_variants_nest_and_the_environment_names_them(monkeypatch):
    assert kernels.forced_variant("attention_bwd") is None
    with kernels.use_variant("attention_bwd", "fused"):
        with kernels.use_variant("attention_bwd", "split"):
            assert kernels.forced_variant("attention_bwd") == "split"
        assert kernels.forced_variant("attention_bwd") == "fused"
    monkeypatch.setenv(kernels.ENV_VARIANT, "attention_bwd=fused, gemm=pointer")
    assert kernels.forced_variant("gemm") == "pointer" and kernels.forced_variant("attention_bwd") == "fused"
    monkeypatch.setenv(kernels.ENV_VARIANT, "gemm=fast")
    with pytest.raises(ValueError, match=kernels.ENV_VARIANT):
        kernels.forced_variant("gemm")


class _Tuner:
    """A triton.autotune kernel whose plain kernel runs out of shared memory for the configs in ``too_big``."""

    def __init__(self, configs, too_big):
        self.arg_names, self.keys, self.configs, self.early_config_prune = ["x_ptr", "M"], ["M"], configs, None
        self.launched, outer = [], self

        class Plain:
            __name__ = "_fake_kernel"

            def __getitem__(self, grid):
                def run(*a, **kw):
                    if kw["BLOCK_M"] in too_big:
                        raise OutOfResources(kw["BLOCK_M"] * 2048, 232448, "shared memory")
                    outer.launched.append(kw["BLOCK_M"])

                return run

        self.fn = Plain()


CONFIGS = [triton.Config({"BLOCK_M": b}, num_warps=4) for b in (256, 128, 64)]


def test_a_fixed_launch_that_does_not_fit_warns_and_takes_the_next_config(monkeypatch):
    monkeypatch.setattr(kernels, "autotuning", lambda: False)
    tuned = _Tuner(CONFIGS, too_big={256, 128})
    with pytest.warns(kernels.KernelFallbackWarning, match="does not fit this device") as caught:
        kernels.launch(tuned, (1,), (torch.empty(1), 5), {})
    assert tuned.launched == [64] and len(caught) == 2  # one warning per config that did not fit


def test_a_launch_where_no_config_fits_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "autotuning", lambda: False)
    tuned = _Tuner(CONFIGS, too_big={256, 128, 64})
    with pytest.warns(kernels.KernelFallbackWarning), \
            pytest.raises(kernels.KernelLaunchError, match="no config of _fake_kernel fits this device"):
        kernels.launch(tuned, (1,), (torch.empty(1), 5), {})
    assert issubclass(kernels.KernelLaunchError, RuntimeError) and tuned.launched == []
