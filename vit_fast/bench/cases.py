"""What is benchmarked per op, read from each op's spec (:class:`vit_fast.ops.spec.Bench` and its input makers):
the shapes, fresh random inputs, the analytic FLOP and byte counts (the useful work, counted the same for every
provider) and the PyTorch ways of computing the same thing. No op is named here: every declared op with a
``bench`` is benchmarked."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from vit_fast import backends
from vit_fast.config import ViTConfig, get_config

OP_MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def seed(*parts: object) -> None:
    """A seed of its own per case: fresh inputs for every case, the same ones on a rerun."""
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def patch_size(cfg: ViTConfig) -> int:
    return cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]


@dataclass
class Inputs:
    """An op's inputs: base tensors (fresh random), which of them get gradients, and how they are assembled
    into the op's ``(args, kwargs)`` (attention takes strided views of one packed qkv tensor)."""

    tensors: dict[str, torch.Tensor]
    grad_names: tuple[str, ...]
    assemble: Callable[[dict[str, torch.Tensor]], tuple[tuple, dict]]
    grad_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for n in self.grad_names:
            self.tensors[n].requires_grad_(True)

    def nbytes(self) -> int:
        ts = [*self.tensors.values(), *([self.grad_out] if self.grad_out is not None else [])]
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, dtype: torch.dtype) -> Inputs:
        tensors = {k: v.detach().to(dtype) for k, v in self.tensors.items()}
        grad_out = None if self.grad_out is None else self.grad_out.to(dtype)
        return Inputs(tensors, self.grad_names, self.assemble, grad_out)

    def replicas(self, n: int) -> list[Inputs]:
        """``n`` copies (this one first), each tensor's copies carved from one allocation: thousands of small
        allocations would each cost page faults."""
        named = {**self.tensors, **({"__grad_out": self.grad_out} if self.grad_out is not None else {})}
        bufs = {k: v.detach().expand(n - 1, *v.shape).contiguous() for k, v in named.items()}
        out = [self]
        for i in range(n - 1):
            tensors = {k: bufs[k][i].detach() for k in self.tensors}
            grad_out = bufs["__grad_out"][i] if self.grad_out is not None else None
            out.append(Inputs(tensors, self.grad_names, self.assemble, grad_out))
        return out

    def leaves(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.grad_names]


def run_once(fn: Callable, inputs: Inputs, mode: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One forward (without autograd) or one forward+backward; the backward returns the gradients of the
    inputs' leaves for ``grad_out`` without accumulating them into ``.grad``."""
    if mode == "fwd":
        with torch.no_grad():
            args, kwargs = inputs.assemble(inputs.tensors)
            return fn(*args, **kwargs), ()
    args, kwargs = inputs.assemble(inputs.tensors)
    out = fn(*args, **kwargs)
    return out, torch.autograd.grad(out, inputs.leaves(), inputs.grad_out)


def preset_dims(name: str) -> dict[str, int]:
    """The sizes of preset ``name`` that the ops' shapes are made of (:attr:`Bench.model_shape`)."""
    cfg = get_config(name)
    return {"N": cfg.num_patches + cfg.num_prefix_tokens, "C": cfg.embed_dim, "H": cfg.num_heads,
            "D": cfg.head_dim, "hidden": cfg.mlp_hidden_dim, "P": patch_size(cfg),
            "img": cfg.grid_size[0] * patch_size(cfg), "in_chans": cfg.in_chans}


# Presets whose token shapes the per-op benchmarks take (ViT-S/B/L/H at 224 and 384, CIFAR size).
GPU_PRESETS = ("vit_tiny_patch4_32", "vit_small_patch16_224", "vit_small_patch16_384", "vit_base_patch16_224",
               "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch16_384", "vit_huge_patch14_224")
CPU_PRESETS = ("vit_tiny_patch4_32", "vit_small_patch4_32", "vit_tiny_patch16_224")
GPU_BATCHES = (8, 64, 256)
CPU_BATCHES = (1, 8)


class OpBench:
    """One op's benchmark, as its spec declares it: shapes, inputs, analytic counts and the PyTorch ways."""

    def __init__(self, op: str) -> None:
        self.spec = backends.spec(op)
        self.name = op
        self.metric, self.shape_keys = self.spec.bench.metric, self.spec.bench.shape_keys

    def shapes(self, quick: bool, gpu: bool) -> list[dict]:
        b = self.spec.bench
        if b.shapes is not None:
            return [dict(s) for s in b.shapes(quick, gpu)]
        if quick:
            return [dict(s) for s in b.quick[0 if gpu else 1]]
        out = []
        for name in GPU_PRESETS if gpu else CPU_PRESETS:
            for batch in GPU_BATCHES if gpu else CPU_BATCHES:
                s = {"B": batch, **self.model_shape(preset_dims(name))}
                if s not in out:
                    out.append(s)
        return out

    def model_shape(self, dims: Mapping[str, int]) -> dict:
        """The op's shape, less the batch, in a model of :func:`preset_dims` ``dims`` (what tune measures)."""
        return dict(self.spec.bench.model_shape(dims))

    def tokens(self, shape: Mapping) -> int:
        """The sequence length, the x axis of the plots."""
        return self.spec.bench.tokens(shape)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes measured: an inference op (the fp8 ones) has no backward."""
        return tuple(self.spec.bench.modes)

    def dims(self, shape: Mapping) -> dict:
        """``shape`` (the report's columns) as the op's case dims."""
        b = self.spec.bench
        return {**(b.to_dims(shape) if b.to_dims else shape), **b.model_dims}

    def make(self, shape: Mapping, dtype: torch.dtype, device: torch.device) -> Inputs:
        """Fresh random inputs of the model's own layout (the op's case maker, seeded by :func:`seed`). An op
        measured forward only assembles each set of tensors once: its assembly quantizes (the fp8 ops), which is
        not the op's work and must stay out of the timing."""
        dims = self.dims(shape)
        cases = self.spec.cases
        device = torch.device(device)
        g = device if device.type == "meta" else torch.Generator(device=device).manual_seed(
            int(torch.randint(0, 2**31 - 1, ()).item()))
        leaves = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in cases.leaves(dims, g).items()}
        if "fwd+bwd" in self.modes:
            return Inputs(leaves, tuple(cases.grads(dims)), lambda t: cases.view(dims, t))
        assembled: dict[int, tuple] = {}  # id of a tensor dict -> (the dict, kept alive so its id stays its own; args)

        def once(t: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
            if id(t) not in assembled:
                assembled[id(t)] = (t, cases.view(dims, t))
            return assembled[id(t)][1]

        return Inputs(leaves, (), once)

    def flops(self, shape: Mapping, mode: str) -> int:
        return self.spec.bench.flops(shape, mode)

    def bytes(self, shape: Mapping, mode: str, elem: int) -> int:
        return self.spec.bench.bytes(shape, mode, elem)

    def reference(self) -> Callable:
        return self.spec.reference

    def public(self) -> Callable:
        return self.spec.public

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        """(name, function with the op's signature, context it runs in) for each eager PyTorch way."""
        return self.spec.bench.baselines()

    def compiled_baseline(self) -> tuple[str, Callable]:
        return self.spec.bench.compiled or ("compiled:reference", self.spec.reference)

    def peers(self) -> list[tuple[str, str, Callable[[], Callable]]]:
        """(name, module that must be importable, factory of a function with the op's signature)."""
        return self.spec.bench.peers()

    def note(self, shapes: list[dict]) -> str | None:
        """A line for the op's section of the report about the measured ``shapes`` (None: nothing to add)."""
        return self.spec.bench.note(shapes)

    def label(self, shape: Mapping) -> str:
        return " ".join(f"{k}{_cell(shape[k])}" for k in self.shape_keys)


def _cell(v: object) -> str:
    return "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


class _Benches(Mapping):
    """op -> its :class:`OpBench`, for every declared op with a ``bench``, read from the registry when asked (an op
    declared later, such as a test's, is found too)."""

    def __getitem__(self, op: str) -> OpBench:
        if op not in backends.ops() or backends.spec(op).bench is None:
            raise KeyError(op)
        return OpBench(op)

    def __iter__(self) -> Iterator[str]:
        return iter([op for op in backends.ops() if backends.spec(op).bench is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)


OP_BENCHES: Mapping[str, OpBench] = _Benches()
OPS: tuple[str, ...] = tuple(OP_BENCHES)  # the benchmarked ops declared at import (the CLI's choices)


def default_ops(device: torch.device) -> list[str]:
    """What a run measures when no ops are named: every benchmarked op on a GPU, those not ``gpu_only`` on CPU."""
    return [op for op in OP_BENCHES if device.type == "cuda" or not OP_BENCHES[op].spec.bench.gpu_only]
