"""What runs, and why: :func:`explain` reports the choice :func:`vit_fast.backends.pick` makes per op (and,
for a model on real inputs, per layer), every reason of every backend that does not run, and the policy in
force with its measured speedups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map_only

from vit_fast import backends, policy
from vit_fast.backends import (
    BACKENDS,
    RAISES,
    BackendUnavailableError,
    Pick,
    dtype_name,
    get_backend,
    pick,
    reasons,
    unavailable,
)


@dataclass
class Explanation:
    """What :func:`explain` found: one row per (op, backend) or, for a model, per (layer, op, backend); and
    the backend picked per row group. The title names the policy in force; ``speedup`` is the policy's
    measured speedup of that backend over the reference (None: not measured), the picked row's note says why."""

    title: str
    rows: list[dict]  # {"where", "op", "backend", "available", "reasons", "note", "picked", "raises", "speedup"}

    @property
    def picked(self) -> dict[str, str]:
        """op (or "layer: op") -> the picked backend, or ``(raises)``."""
        picked = {r["where"]: RAISES for r in self.rows}
        picked.update({r["where"]: r["backend"] for r in self.rows if r["picked"]})
        return picked

    def __str__(self) -> str:
        lines = [self.title]
        w = max((len(r["where"]) for r in self.rows), default=2)
        lines.append(f"{'op':<{w}}  {'backend':<9}  {'runs':<4}  {'measured':<8}  why not")
        for r in self.rows:
            mark = "yes" if r["available"] else "no"
            measured = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
            pick_mark = "  <- picked" if r["picked"] else ("  <- set, raises" if r["raises"] else "")
            detail = "; ".join(r["reasons"]) or (f"- ({r['note']})" if r["note"] else "-")
            lines.append(f"{r['where']:<{w}}  {r['backend']:<9}  {mark:<4}  {measured:<8}  {detail}{pick_mark}")
        return "\n".join(lines)

    __repr__ = __str__


def _rows_for(where: str, op: str, per_backend: dict[str, list[str]], chosen: str, device: torch.device,
              picked: Pick | None = None) -> list[dict]:
    rows = []
    for backend in BACKENDS:
        why = per_backend[backend]
        note = "Triton interpreter: slow, for tests" if backend == "triton" and device.type == "cpu" else ""
        if picked is not None and backend == chosen:
            note = picked.why
        rows.append({"where": where, "op": op, "backend": backend, "available": not why, "reasons": why,
                     "note": note, "picked": backend == chosen,
                     "raises": chosen == RAISES and backend == get_backend(),
                     "speedup": None if picked is None else picked.speedups.get(backend)})
    return rows


def explain(*args, **kwargs) -> Explanation:
    """What runs, and why every other backend does not.

    ``explain(model, images)``: runs ``model`` on ``images`` (no gradients) and reports, per op and layer,
    the backend :func:`pick` chose and every reason of every backend that did not run.

    ``explain(device=None, dtype=None)``: the same for ViT-B/16-sized example inputs of every op; ``device``
    defaults to ``cuda`` when a GPU is visible, else ``cpu``; ``dtype`` to bfloat16 on CUDA and float32 on CPU.
    """
    if args and isinstance(args[0], torch.nn.Module):
        return _explain_model(*args, **kwargs)
    return _explain_examples(*args, **kwargs)


def _explain_examples(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Explanation:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setting = get_backend()
    usable = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())
    rows = []
    for op in backends.ops():
        args, kwargs = backends.example(op, dtype)
        if usable:  # the limits see tensors on the real device (uninitialized: nothing is computed)
            args, kwargs = tree_map_only(
                torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), (args, kwargs)
            )
        if usable:
            per_backend = {b: reasons(b, op, args, kwargs, device=device) for b in BACKENDS}
        else:
            gone = "no CUDA device visible" if device.type == "cuda" else f"device {device.type} not supported"
            per_backend = {b: ([] if b == "reference" else [gone, *filter(None, [unavailable(b)])]) for b in BACKENDS}
        picked = None
        try:
            picked = pick(op, args, kwargs, device=device) if usable else None
            chosen = "reference" if picked is None else picked.backend
        except BackendUnavailableError:
            chosen = RAISES
        rows += _rows_for(op, op, per_backend, chosen, device, picked)
    in_force = policy.describe(device) if usable else "no CUDA device visible: no policy applies"
    title = f"device {device}, dtype {dtype_name(dtype)}, backend setting {setting!r}; {in_force}"
    return Explanation(title, rows)


def _explain_model(model: torch.nn.Module, images: torch.Tensor) -> Explanation:
    """Hooks name the module each op call runs in; :func:`dispatch` reports each pick to the observer. Layers
    that differ only in their index and made the same pick for the same reasons share one row group."""
    stack: list[str] = []
    seen: dict[tuple[str, str], Pick] = {}
    handles = []

    def enter(name: str) -> Callable:
        return lambda module, inputs: stack.append(name) and None

    def leave(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]

    def seen_pick(p: Pick) -> None:
        seen.setdefault((stack[-1] if stack else "", p.op), p)

    try:
        with backends.observe(seen_pick), torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for (where, op), p in seen.items():
        pattern = ".".join("#" if part.isdigit() else part for part in where.split("."))
        key = (pattern, op, p.backend, tuple(tuple(p.reasons[b]) for b in BACKENDS))
        groups.setdefault(key, []).append(where)
    rows = []
    for (pattern, op, chosen, _), wheres in groups.items():
        p = seen[(wheres[0], op)]
        rows += _rows_for(f"{_layer_span(pattern, wheres) or '(model)'}: {op}", op, p.reasons, chosen, images.device,
                          p if chosen != RAISES else None)
    title = (f"{type(model).__name__} on images {tuple(images.shape)} {dtype_name(images.dtype)} "
             f"({images.device}), backend setting {get_backend()!r}; {policy.describe(images.device)}")
    return Explanation(title, rows)


def _layer_span(pattern: str, wheres: list[str]) -> str:
    """``blocks.#.norm1`` over blocks.0..11 -> ``blocks.0-11.norm1`` (or ``blocks.{0,2,5}.norm1``)."""
    if len(wheres) == 1:
        return wheres[0]
    slot = pattern.split(".").index("#")
    indices = sorted(int(w.split(".")[slot]) for w in wheres)
    contiguous = indices == list(range(indices[0], indices[-1] + 1))
    span = f"{indices[0]}-{indices[-1]}" if contiguous else "{" + ",".join(map(str, indices)) + "}"
    parts = pattern.split(".")
    parts[slot] = span
    return ".".join(parts).replace("#", "*")
