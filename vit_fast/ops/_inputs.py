"""Building blocks of the ops' input makers (:class:`vit_fast.ops.spec.Cases`): seeded float64 storage, the
strided views the suites draw, the sizes hypothesis draws, and the error budget of e4m3 rows.

Hypothesis is a test dependency: the strategy helpers import it when a suite calls them, never at import."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vit_fast.ops._fp8 import E4M3_MAX

# Views an (B, N, C) activation is drawn as: the first is the model's own (contiguous), the others strided.
ROW_LAYOUTS = ("contiguous", "rows_sliced", "cols_sliced", "transposed", "batch_transposed")
VIT_LENGTHS = (197, 257, 577)  # ViT sequence lengths: 14 x 14 + 1, 16 x 16 + 1, 24 x 24 + 1
ODD_LENGTHS = (1, 7, 50, 65)


def randn(g: torch.Generator | torch.device, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """Seeded storage ``N(mean, std^2)`` on the generator's device: float64 on CPU (the tests' masters), float32 on
    a GPU (the benchmarks' inputs, up to gigabytes, cast to their dtype at once). ``g`` the meta device: shapes
    alone (a policy's buckets), no values."""
    if isinstance(g, torch.device):
        return torch.empty(*shape, device=g)
    dtype = torch.float64 if g.device.type == "cpu" else torch.float32
    return torch.randn(*shape, generator=g, device=g.device, dtype=dtype) * std + mean


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def row_leaf(g: torch.Generator, layout: str, b: int, n: int, c: int) -> torch.Tensor:
    """The storage a (B, N, C) activation of ``layout`` is a view of; rows off zero mean and unit variance."""
    shape = {
        "contiguous": (b, n, c),
        "rows_sliced": (b, 2 * n, c),  # every other token
        "cols_sliced": (b, n, c + 5),  # a column window: row stride C + 5, storage offset 2
        "transposed": (b, c, n),  # column stride N
        "batch_transposed": (n, b, c),  # leading dims that do not merge into one row index
    }[layout]
    return randn(g, *shape, std=2.0, mean=0.5)


def row_view(leaf: torch.Tensor, layout: str, c: int) -> torch.Tensor:
    """The (B, N, C) view of ``layout``'s storage :func:`row_leaf` made."""
    if layout == "rows_sliced":
        return leaf[:, ::2]
    if layout == "cols_sliced":
        return leaf[..., 2 : c + 2]
    if layout == "transposed":
        return leaf.transpose(1, 2)
    if layout == "batch_transposed":
        return leaf.transpose(0, 1)
    return leaf


def column_slice(t: torch.Tensor, start: int = 5, extra: int = 13) -> torch.Tensor:
    """``t`` (..., C) as columns of a wider buffer: rows C + extra apart, unit column stride."""
    wide = t.new_zeros(*t.shape[:-1], t.shape[-1] + extra)
    wide[..., start:start + t.shape[-1]] = t.detach()
    return wide[..., start:start + t.shape[-1]]


def transposed(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, C) with column-major memory: no unit column stride."""
    return t.detach().t().contiguous().t()


def every_other(t: torch.Tensor) -> torch.Tensor:
    """``t`` as every other element of a buffer twice as long along its last dimension."""
    return torch.stack([t.detach(), t.detach()], dim=-1)[..., 0]


def row_nan(b: int, n: int, col: int):
    """A poison for a row-wise op's (B, N, C) input ``x``: one NaN at (b, n, col) -> that whole output row."""

    def poison(leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = leaves["x"]
        x[b, n, col] = float("nan")
        mask = torch.zeros(*x.shape[:-1], 1, dtype=torch.bool, device=x.device)
        mask[b, n] = True
        return mask

    return poison


def layer_norm_by_hand(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm written out: (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance."""
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps) * w + b


def rows_of(dims: Mapping[str, object]) -> int:
    return int(dims["B"]) * int(dims["N"])


# ---- hypothesis: sizes worth drawing ---------------------------------------------------------------------------


def seq_lengths(most: int):
    """N in 1..most, often one of ViT's sequence lengths (patches + CLS) or an odd one."""
    from hypothesis import strategies as st

    special = [n for n in (*ODD_LENGTHS, *VIT_LENGTHS) if n <= most]
    return st.one_of(st.sampled_from(special), st.integers(1, most)) if special else st.integers(1, most)


def widths(most: int, least: int = 1):
    """A feature width in least..most: ViT's (192, 384, 768), odd ones, or any."""
    from hypothesis import strategies as st

    special = [c for c in (1, 3, 24, 77, 192, 209, 384, 768, 1000) if least <= c <= most]
    return st.one_of(st.sampled_from(special), st.integers(least, most))


# PyTorch's fp32 LayerNorm (x * rstd - mean * rstd) multiplies rounding by 1/sqrt(eps) where a row's variance
# vanishes, as in rows of one or two columns: 6e-5 off a mathematically zero dx, where math written out is exact.
# The reference is held to written-out math from this width up; the kernels, judged against the reference, at
# every width.
REFERENCE_MIN_WIDTH = 4


# Repeats weight the draws (hypothesis draws sampled_from's indices near uniformly): bf16 one draw in five; an
# empty batch one in seven.
DTYPES = (torch.float32, torch.float16, torch.float32, torch.float16, torch.bfloat16)
BATCHES = (1, 2, 3, 1, 2, 3, 0)


# ---- e4m3 rows: the error budget of a quantized row against its exact values ------------------------------------

def close_rows(out: tuple[torch.Tensor, torch.Tensor], exact: torch.Tensor, inputs: tuple, name: str) -> None:
    """The error budget of e4m3 rows quantized from values computed in fp32 (the ``close`` rule of quantize_rows
    and layer_norm_fp8): :func:`assert_fp8_rows`."""
    assert_fp8_rows(*out, exact, name)


def assert_fp8_rows(q: torch.Tensor, scale: torch.Tensor, exact: torch.Tensor, name: str, *,
                    unit: float = 2.0**-23) -> None:
    """(q (M, C) e4m3, scale (M,) or (M, G)) against the exact float64 rows ``exact`` (M, C): each scale is its
    group's amax / 448 (to fp32 rounding of the amax), and ``q * scale`` rounds each value to e4m3: off by at most
    half an e4m3 step (2^-4 of the value; 2^-10 of the scale below e4m3's normal range), with slack for a kernel
    whose fp32 values sit a rounding away from the exact ones. A NaN in a group makes its scale and its values
    NaN. ``unit``: the relative rounding of the values before they are quantized (fp32's, or the input dtype's where
    they pass through it, as attention's probabilities and output do), a few of which the scales and values may be
    off by (four of them, at the tensor's magnitude)."""
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, f"{name}: dtypes {q.dtype}, {scale.dtype}"
    m, c = exact.shape
    groups = scale.reshape(m, -1)
    g = groups.shape[1]
    exact_g = exact.reshape(m, g, c // g)
    amax = exact_g.abs().amax(dim=2)  # NaN where the group has one
    want = (amax.clamp_min(1e-12) / E4M3_MAX).where(~amax.isnan(), amax)
    got = groups.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN scales where the exact rows have none (or none where)"
    # the rows' values are off by a few units of their rounding at the tensor's magnitude (a row whose values
    # cancel to near zero keeps the absolute error of the terms it summed, not a relative one)
    largest = want.nan_to_num().abs().max().item() if want.numel() else 0.0
    ok = got.isnan() | ((got - want).abs() <= 4 * unit * (want.abs() + largest) + 1e-30)
    assert ok.all(), f"{name}: scales off amax / 448 at {int((~ok).sum())} groups"
    deq = q.double().reshape(m, g, c // g) * got[..., None]
    assert torch.equal(deq.isnan(), exact_g.isnan() | got[..., None].isnan().expand_as(deq)), (
        f"{name}: NaN values where the exact rows have none (or none where)")
    rounding = (amax[..., None] + largest * E4M3_MAX) * 4 * unit
    bound = exact_g.abs() * (2.0**-4 * 1.01) + got[..., None] * 2.0**-10 + rounding
    err = (deq - exact_g).abs()
    bad = ~(err <= bound) & ~deq.isnan()
    assert not bad.any(), f"{name}: {int(bad.sum())} values off their e4m3 rounding (worst {err[bad].max():.3g})"
