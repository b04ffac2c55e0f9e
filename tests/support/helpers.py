"""What the test files share: the device, fresh leaves, the backend markers, the launch spy, the oracle check by
the one tolerance rule (vit_fast.tolerance), the quantized ops' comparisons with their reference and an input
maker per op.

Inputs travel as ``(args, kwargs)``, exactly as the public op takes them, so one check serves every op:
``check_oracle("layer_norm", "triton", *layer_norm_inputs((4, 80)))``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

import vit_fast
from vit_fast import backends
from vit_fast.ops._inputs import column_slice, every_other, transposed  # noqa: F401 - the tests' strided views
from vit_fast.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKENDS = tuple(b for b in backends.BACKENDS if b != "reference")


# ---- backends --------------------------------------------------------------------------------------------------


def needs(backend: str) -> list[pytest.MarkDecorator]:
    """Marks for a test that runs ``backend``: skip with its reason where it cannot run at all; the cuda
    backend's tests also carry the ``cuda`` marker (they need a GPU even where the extension is built)."""
    why = backends.unavailable(backend)
    marks = [pytest.mark.skipif(why is not None, reason=f"{backend} backend unavailable: {why}")]
    return [pytest.mark.cuda, *marks] if backend == "cuda" else marks


needs_triton = needs("triton")[0]


def backend_params(*names: str) -> list:
    """``pytest.param`` per backend, with :func:`needs` marks: parametrize a test over backends."""
    return [pytest.param(b, marks=needs(b) if b in KERNEL_BACKENDS else (), id=b) for b in names]


# ---- the launch spy ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def launches() -> Iterator[list[backends.Launch]]:
    """Every implementation run inside the block (``backends.trace``): proof that the backend under test, not a
    fallback, produced what the test checks. Kernel backends record from inside their custom ops, so compiled
    graphs record too."""
    with backends.trace() as rec:
        yield rec


def count(rec: list[backends.Launch], backend: str, phase: str = "fwd", op: str | None = None) -> int:
    return sum(1 for r in rec if r.backend == backend and r.phase == phase and (op is None or r.op == op))


class _CustomOpCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vit_fast":
            self.calls.append((func.name().split("::")[-1].split(".")[0], args))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def custom_op_calls() -> Iterator[list[tuple[str, tuple]]]:
    """``(name, args)`` of every ``torch.ops.vit_fast`` call inside the block (``attention_fwd_triton``, ...), as
    the dispatcher sees it: what the public op and the autograd rule pass to the kernels' custom ops."""
    with _CustomOpCalls() as mode:
        yield mode.calls


# ---- inputs ----------------------------------------------------------------------------------------------------


def leaves(tensors, dtype: torch.dtype | None = None, *, grad: bool | None = None):
    """Fresh leaf copies of a tensor, a sequence or a pytree (None passes through), cast to ``dtype``;
    ``requires_grad`` as the original unless ``grad`` says otherwise."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad if grad is None else grad)

    return tree_map_only(torch.Tensor, copy, tensors)


def public(op: str):
    return backends.spec(op).public


def reference(op: str):
    return backends.spec(op).reference


def named_inputs(op: str, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The tensor arguments of a call by parameter name, in signature order."""
    bound = inspect.signature(public(op)).bind(*args, **kwargs).arguments
    return {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}


def run(op: str, backend: str, args: tuple, kwargs: dict) -> torch.Tensor:
    with vit_fast.set_backend(backend):
        return public(op)(*args, **kwargs)


def packed_qkv(B: int, N: int, H: int, D: int, dtype: torch.dtype = torch.float32, device: str = DEVICE):
    """q, k, v as (B, H, N, D) leaf views of one packed (B, N, 3, H, D) buffer: the model's layout."""
    qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype)
    return tuple(t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # 3 x (B, H, N, D)


def attention_inputs(B: int, H: int, N: int, D: int, dtype: torch.dtype = torch.float32, device: str = DEVICE,
                     **kwargs) -> tuple[tuple, dict]:
    return packed_qkv(B, N, H, D, dtype, device), kwargs


def layer_norm_inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *,
                      param_dtype: torch.dtype | None = None, device: str = DEVICE, **kwargs) -> tuple[tuple, dict]:
    """x (shape), weight around 1 and bias around 0 (C,): rows off zero mean and unit variance."""
    c = shape[-1]
    x = (torch.randn(*shape, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(c, device=device)).to(param_dtype or dtype).requires_grad_()
    b = (0.5 * torch.randn(c, device=device)).to(param_dtype or dtype).requires_grad_()
    return (x, w, b), kwargs


def layernorm_mlp_inputs(shape: tuple[int, ...], hidden: int, dtype: torch.dtype = torch.float32, *,
                         c_out: int | None = None, residual: bool = False, param_dtype: torch.dtype | None = None,
                         device: str = DEVICE, **kwargs) -> tuple[tuple, dict]:
    """x (..., C), the six parameters scaled for O(1) activations, and ``residual`` (..., C_out) when asked."""
    c = shape[-1]
    c_out = c if c_out is None else c_out
    pdt = param_dtype or dtype

    def p(*s: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*s, device=device) * scale + shift).to(pdt).requires_grad_()

    x = torch.randn(*shape, device=device).to(dtype).requires_grad_()
    params = (p(c, scale=0.2, shift=1.0), p(c, scale=0.2), p(hidden, c, scale=c**-0.5), p(hidden, scale=0.2),
              p(c_out, hidden, scale=hidden**-0.5), p(c_out, scale=0.2))
    res = torch.randn(*shape[:-1], c_out, device=device).to(dtype).requires_grad_() if residual else None
    return (x, *params), {"residual": res, **kwargs}


def patch_embed_inputs(b: int, c: int, h: int, w: int, p: int, e: int, *, cls: bool = True, pos: str | None = "1+N",
                       bias: bool = True, dtype: torch.dtype = torch.float32, device: str = DEVICE,
                       **kwargs) -> tuple[tuple, dict]:
    """images (B, C, H, W), weight (E, C, P, P), bias; class token and a position embedding of length
    ``pos`` ("1+N", "N" or None)."""
    n = (h // p) * (w // p)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    args = (leaf(b, c, h, w), leaf(e, c, p, p, scale=(c * p * p) ** -0.5), leaf(e) if bias else None)
    return args, {"cls_token": leaf(1, 1, e) if cls else None,
                  "pos_embed": None if pos is None else leaf(1, n + (pos == "1+N"), e, scale=0.5), **kwargs}


# The quantized-inference ops are forward only: their inputs never require grad.


def quantize_rows_inputs(shape: tuple[int, int], dtype: torch.dtype = torch.float32, *, device: str = DEVICE,
                         **kwargs) -> tuple[tuple, dict]:
    """x (M, C) with rows of different magnitudes, so each row gets a scale of its own."""
    m, c = shape
    x = torch.randn(m, c, device=device) * torch.logspace(-1, 1, m, device=device)[:, None]
    return (x.to(dtype),), kwargs


def layer_norm_fp8_inputs(shape: tuple[int, int], dtype: torch.dtype = torch.float32, *, device: str = DEVICE,
                          **kwargs) -> tuple[tuple, dict]:
    """:func:`layer_norm_inputs` for (M, C) rows, without gradients."""
    return leaves(layer_norm_inputs(shape, dtype, device=device, **kwargs), grad=False)


def scaled_linear_inputs(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, *, bias: bool = True,
                         device: str = DEVICE) -> tuple[tuple, dict]:
    """e4m3 x_q (M, K) with per-row scales, e4m3 weight_q (N, K) with per-channel scales (quantized by the
    reference), a bias in ``dtype`` and ``out_dtype=dtype``: ``dtype`` is the float side of the op."""
    x_q, x_scale = vit_fast.ops.quantize_rows_ref(torch.randn(m, k, device=device))
    weight_q, weight_scale = vit_fast.ops.quantize_rows_ref(torch.randn(n, k, device=device) * k**-0.5)
    b = (0.5 * torch.randn(n, device=device)).to(dtype) if bias else None
    return (x_q, x_scale, weight_q, weight_scale, b), {"out_dtype": dtype}


def int8_linear_inputs(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[tuple, dict]:
    """x (M, K) on CPU (fbgemm's int8 kernels are CPU only, whatever the suite's device) and the prepacked
    per-channel int8 weight and bias of a random Linear, packed as :class:`vit_fast.quantization.Int8Linear` packs."""
    return int8_linear_args(torch.randn(m, k).to(dtype), torch.nn.Linear(k, n))


def int8_linear_args(x: torch.Tensor, linear: torch.nn.Linear) -> tuple[tuple, dict]:
    """int8_linear's (args, kwargs) for ``x`` and the weight and bias of ``linear``, packed as
    :class:`vit_fast.quantization.Int8Linear` packs them."""
    from vit_fast.quantization import Int8Linear

    packed = Int8Linear.from_linear(linear)._pack()
    return (x, packed), {"reduce_range": torch.backends.quantized.engine in ("x86", "fbgemm")}


# ---- the oracle check ------------------------------------------------------------------------------------------


def _grads(out: torch.Tensor, inputs: dict[str, torch.Tensor], dout: torch.Tensor) -> dict[str, torch.Tensor]:
    wanted = {k: t for k, t in inputs.items() if t.requires_grad}
    if not wanted:
        return {}
    return dict(zip(wanted, torch.autograd.grad(out, list(wanted.values()), dout), strict=True))


def check_oracle(op: str, backend: str, args: tuple, kwargs: dict, *, dout: torch.Tensor | None = None,
                 atol: float | None = None, bwd_launch: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``op`` under ``backend``: the output and the gradient of every input that requires grad against the
    float64 oracle (``<op>_ref(upcast=True)`` on float64 copies) by the one tolerance rule, with the reference
    in the inputs' own dtypes as the yardstick; output and gradient dtypes as the reference's. Asserts that
    ``backend`` launched the forward and, when gradients are asked for, its backward (not at all when
    ``bwd_launch`` is False: gradients that need no kernel).
    Returns the output and the gradients by input name."""
    inputs = named_inputs(op, args, kwargs)
    with launches() as rec:
        out = run(op, backend, args, kwargs)
        if dout is None:
            dout = torch.randn(out.shape, device=out.device).to(out.dtype)
        got = _grads(out, inputs, dout)
    oracle_args, oracle_kwargs = leaves((args, kwargs), torch.float64)
    oracle = reference(op)(*oracle_args, **oracle_kwargs, upcast=True)
    low_args, low_kwargs = leaves((args, kwargs))
    low = reference(op)(*low_args, **low_kwargs)
    assert out.dtype == low.dtype, f"out: dtype {out.dtype}, the reference's {low.dtype}"
    assert_close(out, low, oracle, name="out", atol=atol)
    want = _grads(oracle, named_inputs(op, oracle_args, oracle_kwargs), dout.double())
    lows = _grads(low, named_inputs(op, low_args, low_kwargs), dout)
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, f"d{name}: {g.dtype} {g.shape}"
        assert_close(g, lows[name], want[name], name=f"d{name}", atol=atol)
    assert count(rec, backend, "fwd", op) >= 1, f"{backend} did not run {op}'s forward: {rec}"
    if got and backend != "reference":  # the reference's backward is PyTorch autograd's: nothing to record
        ran = count(rec, backend, "bwd", op)
        assert ran >= 1 if bwd_launch else ran == 0, f"{backend}'s backward of {op} ran {ran} times: {rec}"
    return out, got


# ---- the quantized ops' comparisons: there is no float64 oracle of a quantized result ------------------------------


def tensor_close(out: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Same op, same dtypes, other strides or another trace: the reference's result to rounding."""
    assert out.dtype == want.dtype, f"{name}: dtype {out.dtype}, the reference's {want.dtype}"
    torch.testing.assert_close(out, want, equal_nan=True, msg=lambda m: f"{name}: {m}")


def fp8_rows_close(out: tuple, want: tuple, name: str) -> None:
    """(q, scale) against the reference's: the scales to fp32 rounding, q * scale within one e4m3 step at the
    row's largest magnitude (2^-3 of it: a rounding tie may go the other way in a kernel), NaNs where the
    reference has them."""
    (q, scale), (wq, wscale) = out, want
    assert (q.dtype, scale.dtype) == (wq.dtype, wscale.dtype), f"{name}: dtypes {q.dtype}, {scale.dtype}"
    torch.testing.assert_close(scale, wscale, rtol=1e-5, atol=1e-12, equal_nan=True, msg=lambda m: f"{name}: {m}")
    deq, wdeq = q.float() * scale[:, None], wq.float() * wscale[:, None]
    assert torch.equal(deq.isnan(), wdeq.isnan()), f"{name}: NaNs where the reference has none (or none where)"
    step = wdeq.abs().nan_to_num().amax(dim=1, keepdim=True) * 2**-3 + 1e-6
    assert ((deq - wdeq).abs().nan_to_num() <= step).all(), f"{name}: q * scale off the reference by over a step"


def gemm_close(out: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Another FP8 GEMM kernel than the reference's: the same e4m3 products (exact in fp32), summed in another
    order, so fp32 results agree to a few fp32 roundings of the largest output, not bit for bit."""
    assert out.dtype == want.dtype, f"{name}: dtype {out.dtype}, the reference's {want.dtype}"
    big = want.abs().nan_to_num().max().item() if want.numel() else 0.0
    rtol = {torch.float32: 1e-5}.get(out.dtype)
    torch.testing.assert_close(out, want, equal_nan=True, rtol=rtol, atol=None if rtol is None else rtol * big,
                               msg=lambda m: f"{name}: {m}")


def attention_fp8_close(out: tuple, want: tuple, name: str) -> None:
    """(e4m3 (B*N, H*D), scale (B*N, H)) as rows of D values with one scale each, checked as
    :func:`fp8_rows_close` checks rows. A kernel quantizes its fp32 attention output, the reference the output
    rounded to the input dtype: in half precision the scales differ by up to that rounding (bf16's 2^-8)."""
    (q, scale), (wq, wscale) = out, want
    assert (q.dtype, scale.dtype, q.shape, scale.shape) == (wq.dtype, wscale.dtype, wq.shape, wscale.shape), name
    torch.testing.assert_close(scale, wscale, rtol=2**-7, atol=1e-12, equal_nan=True, msg=lambda m: f"{name}: {m}")
    d = q.shape[1] // max(scale.shape[1], 1)
    deq = q.float().view(-1, d) * scale.reshape(-1, 1)
    wdeq = wq.float().view(-1, d) * wscale.reshape(-1, 1)
    assert torch.equal(deq.isnan(), wdeq.isnan()), f"{name}: NaNs where the reference has none (or none where)"
    step = wdeq.abs().nan_to_num().amax(dim=1, keepdim=True) * (2**-3 + 2**-7) + 1e-6
    assert ((deq - wdeq).abs().nan_to_num() <= step).all(), f"{name}: q * scale off the reference by over a step"


def autocast_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, backend: str) -> list[float]:
    """The losses of ``steps`` AdamW steps of ``model`` under bf16 autocast on ``backend``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    with vit_fast.set_backend(backend):
        for _ in range(steps):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def assert_nested_close(a, b, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """``a`` and ``b`` (tensors, or lists/tuples of them, nested) are equal within the tolerances."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_nested_close(x, y, atol, rtol)
    else:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _variant_marks() -> tuple[pytest.MarkDecorator, pytest.MarkDecorator]:
    import vit_fast.kernels as kernels

    interpreter = pytest.mark.skipif(not kernels.interpreting(), reason="kernel numerics on CPU run under the "
                                     "Triton interpreter (TRITON_INTERPRET=1)")
    tma = pytest.mark.skipif(kernels.tma_api_missing() is not None, reason=str(kernels.tma_api_missing()))
    return interpreter, tma


# Kernel-variant tests: the interpreter runs descriptor loads and stores (tensor descriptors) as gathers with zero
# padding; the TMA hardware path itself only the sm_90 compiles (tests/suites/test_kernel_resources.py) and a GPU
# run see.
needs_interpreter, needs_tma = _variant_marks() if backends.unavailable("triton") is None else (
    pytest.mark.skip(reason=str(backends.unavailable("triton"))),) * 2
