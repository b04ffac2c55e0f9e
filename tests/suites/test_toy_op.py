"""A new op is one declaration: this module declares a toy op (``toy_scale2``: 2 * x, with a reference and a Triton
kernel, forward and backward) and nothing else in the repository names it, yet the contract suite, the property
suite and ``vit-fast bench`` cover it.

``torch.ops`` registrations cannot be undone, so the op is declared only in a child process
(``VIT_FAST_TOY_OP=1``, this module loaded as a pytest plugin there): it leaks into no other test here.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
OP = "toy_scale2"


def _declare() -> None:
    import triton
    import triton.language as tl
    from vit_fast.kernels import empty

    from vit_fast import backends
    from vit_fast.backends import Call, Facts, Limits
    from vit_fast.ops import _checks
    from vit_fast.ops._inputs import DTYPES, randn, widths
    from vit_fast.ops.spec import Bench, Cases, Contract, OpSpec, declare, register_backend

    @triton.jit
    def _scale2_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):  # x_ptr, out_ptr: (n,) contiguous
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)  # fp32 math, as every kernel here: exact for x + x
        tl.store(out_ptr + offs, (x + x).to(out_ptr.dtype.element_ty), mask=mask)

    def _launch(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = empty(tuple(x.shape), dtype=x.dtype, device=x.device)
        if x.numel():
            _scale2_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
        return out

    def toy_scale2_ref(x: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
        return 2 * (x.float() if upcast else x)

    def toy_scale2(x: torch.Tensor) -> torch.Tensor:
        """2 * x. Args: x: any shape, floating point. Returns: like x."""
        _checks.tensor("x", x)
        return backends.dispatch(OP, Call((x,)))

    def view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
        return (t["x"].t() if dims.get("layout") == "transposed" else t["x"],), {}

    def poison(leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
        leaves["x"][1, 2] = float("nan")
        mask = torch.zeros_like(leaves["x"], dtype=torch.bool)
        mask[1, 2] = True
        return mask

    def strategy(budget: str):
        from hypothesis import strategies as st

        return st.tuples(st.sampled_from(DTYPES), st.fixed_dictionaries(
            {"M": st.integers(0, 9), "C": widths(40), "layout": st.sampled_from(("contiguous", "transposed"))}))

    cases = Cases(
        leaves=lambda dims, g: {"x": randn(g, int(dims["M"]), int(dims["C"]))}, view=view,
        oracle=lambda dims, t: 2 * view(dims, t)[0][0], reduction=lambda dims: 1, grads=lambda dims: ("x",),
        small={"M": 5, "C": 7}, empty=({"M": 0, "C": 7},), layouts=("contiguous", "transposed"),
        nan=(("x", poison),), requested=((("x",), True),), strategy=strategy,
        bad=lambda: [(([1.0],), {}, TypeError, "x must be a torch.Tensor")])
    bench = Bench("GB/s", ("B", "C"), ((), ({"B": 64, "C": 384},)), model_shape=lambda d: {"C": d["C"]},
                  flops=lambda s, mode: 0, bytes=lambda s, mode, elem: 2 * s["B"] * s["C"] * elem,
                  baselines=lambda: [("eager", lambda x: 2 * x, contextlib.nullcontext)],
                  compiled=None, tokens=lambda s: s["B"], to_dims=lambda s: {"M": s["B"], "C": s["C"]})
    contract = Contract("(Tensor x) -> Tensor", lambda x: torch.empty_like(x, memory_format=torch.contiguous_format),
                        bwd_schema="(Tensor grad) -> Tensor", bwd_fake=lambda g: torch.empty_like(g),
                        setup_context=lambda ctx, inputs, output: None, backward=lambda bwd: lambda ctx, g: bwd(g))
    spec = declare(OpSpec(OP, toy_scale2, toy_scale2_ref, lambda x: Call((x,)), lambda call: Facts(),
                          lambda call: (backends.size_bucket(call.args[0].numel()),),
                          lambda dtype: ((torch.empty(64, 384, device="meta", dtype=dtype),), {}), contract, cases,
                          bench))
    register_backend(spec, "triton", Limits(devices=("cuda", "cpu")), fwd=_launch, bwd=_launch)


if os.environ.get("VIT_FAST_TOY_OP") == "1":  # only in the child: see the module docstring
    _declare()


def _child(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # the plugin imports vit_fast before the child's conftest could switch the interpreter on: inherit this one's
    env = {**os.environ, "VIT_FAST_TOY_OP": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
           "PYTHONPATH": os.pathsep.join([str(TESTS / "suites"), str(TESTS / "support"),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.subprocess
def test_a_declared_op_gets_contract_property_and_bench_coverage(tmp_path):
    suites = [str(TESTS / "suites" / "test_contract.py"), str(TESTS / "suites" / "test_properties.py")]
    r = _child(["-m", "pytest", "-q", "-p", "test_toy_op", "-p", "no:cacheprovider", "-m", "not slow", "-k", OP,
                "--rootdir", str(TESTS.parent), "-c", str(TESTS.parent / "pyproject.toml"), *suites], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    # the contract's clauses (empty, float64, opcheck, compile, determinism, gradients, NaN, bad input, strides)
    # on the reference and Triton, and the two property tests
    assert passed >= 20, summary
    bench = ("import test_toy_op, sys; from vit_fast.cli import main; "
             "sys.exit(main(['bench', '--device', 'cpu', '--quick', '--ops', 'toy_scale2', '--models', 'none', "
             "'--no-compile', '--no-progress', '--out', 'out']))")
    r = _child(["-c", bench], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    ran = {(row["name"], row["provider"]) for row in rows if row.get("status") == "ok"}
    assert {(OP, "vit_fast:reference"), (OP, "eager")} <= ran, ran
