"""The speed targets (model images/s, per-op ratios to PyTorch and bandwidth), evaluated on a run's rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def _gap(got: float, need: float) -> str:
    """How far ``got`` falls short of ``need``, as a signed percentage (a tenth of a percent near zero)."""
    rel = got / need - 1
    return f"{rel:+.1%}" if abs(rel) < 0.005 else f"{rel:+.0%}"


@dataclass(frozen=True)
class Target:
    """A model speed target: images/s of the fastest vit_fast provider, and its ratio to named baselines."""

    what: str
    model: str
    mode: str
    batch: int
    dtype: str
    min_images_per_s: float
    min_vs: tuple[tuple[str, float], ...]

    def required(self) -> str:
        return ", ".join([f">= {self.min_images_per_s:,.0f} images/s"] + [f">= {x:.2f}x {p}" for p, x in self.min_vs])

    def evaluate(self, rows: list[dict], gpu: str) -> tuple[str, str]:
        """(measured, status) from the rows of a GPU run."""
        mine = [r for r in rows if r["kind"] == "model" and r["name"] == self.model and r["mode"] == self.mode
                and r.get("batch") == self.batch and r["dtype"] == self.dtype and r["status"] == "ok"]
        ours = [r for r in mine if r["provider_kind"] == "vit_fast"]
        if not ours:
            return "-", "not measured"
        best = max(ours, key=lambda r: r["images_per_s"])
        got = [f"{best['images_per_s']:,.0f} images/s ({best['provider']})"]
        missed = []
        if best["images_per_s"] < self.min_images_per_s:
            missed.append(f"{_gap(best['images_per_s'], self.min_images_per_s)} on images/s")
        for prov, x in self.min_vs:
            ref = next((r for r in mine if r["provider"] == prov), None)
            if ref is None:
                missed.append(f"{prov} not measured")
                continue
            ratio = best["images_per_s"] / ref["images_per_s"]
            got.append(f"{ratio:.2f}x {prov}")
            if ratio < x:
                missed.append(f"{_gap(ratio, x)} on the ratio to {prov}")
        return ", ".join(got) + f" on {gpu}", "met" if not missed else "missed (" + "; ".join(missed) + ")"


@dataclass(frozen=True)
class OpShape:
    """A shape an op target names: the dimensions it fixes and, for row-wise ops, a range of rows ``B * N``.
    The other dimensions are free; of the matching cases of a run the one with the largest batch is taken
    (small batches measure launch overhead, not the kernel)."""

    fixed: tuple[tuple[str, int], ...]
    rows: tuple[int, int] | None = None

    def matches(self, shape: dict[str, int]) -> bool:
        if any(shape.get(k) != v for k, v in self.fixed):
            return False
        return self.rows is None or self.rows[0] <= shape["B"] * shape["N"] <= self.rows[1]

    def __str__(self) -> str:
        rows = [f"B*N {self.rows[0]:,}-{self.rows[1]:,}"] if self.rows else []
        return " ".join(rows + [f"{k}{v}" for k, v in self.fixed])


def _op_shape(rows: tuple[int, int] | None = None, **fixed: int) -> OpShape:
    return OpShape(tuple(fixed.items()), rows)


@dataclass(frozen=True)
class OpTarget:
    """A per-op speed target, on the run's rows of ``op`` in ``mode`` and ``dtype`` at every shape of
    ``shapes``. "Ours" is the fastest vit_fast kernel backend of a case (every vit_fast backend but the
    reference). ``min_vs``: (baselines, ratio): ours must be ``ratio`` times as fast as the fastest of those
    baselines that ran in the same case; a ratio of None reports the figure without a target. ``min_gbps``:
    the bandwidth ours must reach. With several shapes the worst case is shown."""

    what: str
    op: str
    mode: str
    shapes: tuple[OpShape, ...]
    min_vs: tuple[tuple[tuple[str, ...], float | None], ...] = ()
    min_gbps: float | None = None
    dtype: str = "bfloat16"

    def required(self) -> str:
        need = [f">= {self.min_gbps:,.0f} GB/s"] if self.min_gbps else []
        for bases, x in self.min_vs:
            need.append(f">= {x:.2f}x {_baselines(bases)}" if x is not None else
                        f"none: the ratio to {_baselines(bases)} is reported")
        return ", ".join(need) + (", at every shape" if len(self.shapes) > 1 else "")

    def evaluate(self, rows: list[dict], gpu: str) -> tuple[str, str]:
        """(measured, status) from the rows of a GPU run."""
        cases, absent = self._cases(rows)
        ours: dict[str, dict] = {}
        missed: list[str] = []
        failed: dict[str, list[str]] = {}  # what went wrong -> the shapes it happened at
        unmeasured: dict[str, list[str]] = {}
        for label, rs in cases.items():
            kernels = [r for r in rs if r["provider_kind"] == "vit_fast" and r["provider"] != "vit_fast:reference"]
            ok = [r for r in kernels if r["status"] == "ok"]
            if ok:
                ours[label] = min(ok, key=lambda r: r["median_ms"])
            elif any(r["status"] == "failed" for r in kernels):
                why = ", ".join(r["provider"] for r in kernels if r["status"] == "failed") + " failed"
                failed.setdefault(why, []).append(label)
            else:
                why = "no vit_fast kernel ran" + (f" ({', '.join(r['provider'] + ' ' + r['status'] for r in kernels)})"
                                                  if kernels else "")
                unmeasured.setdefault(why, []).append(label)
        got = []
        if self.min_gbps is not None and ours:
            label, worst = min(ours.items(), key=lambda kv: kv[1]["gbps"])
            got.append(f"{self._worst()}{worst['gbps']:,.0f} GB/s ({worst['provider']}) at {label}")
            if worst["gbps"] < self.min_gbps:
                missed.append(f"{_gap(worst['gbps'], self.min_gbps)} on GB/s at {label}")
        for bases, x in self.min_vs:
            ratios = []
            for label, mine in ours.items():
                base = [r for r in cases[label] if r["provider"] in bases and r["status"] == "ok"]
                if base:
                    b = min(base, key=lambda r: r["median_ms"])
                    ratios.append((b["median_ms"] / mine["median_ms"], label, b["provider"]))
                else:
                    unmeasured.setdefault(f"no {_baselines(bases, short=True)} row", []).append(label)
            if not ratios:
                continue
            ratio, label, base_name = min(ratios)
            got.append(f"{self._worst()}{ratio:.2f}x {base_name} ({ours[label]['provider']}) at {label}")
            below = sum(x is not None and r < x for r, *_ in ratios)
            if below:
                count = f", {below} of {len(ratios)} shapes below" if len(ratios) > 1 else ""
                missed.append(f"{_gap(ratio, x)} on the ratio to {_baselines(bases)} at {label}{count}")
        missed += [f"{why} at {', '.join(labels)}" for why, labels in failed.items()]
        measured = "; ".join(got) + f" on {gpu}" if got else "-"
        if absent:
            measured = ("" if measured == "-" else measured + "; ") + "not in this run: " + ", ".join(absent)
        if missed:
            return measured, "missed (" + "; ".join(missed) + ")"
        if absent:
            return measured, "not measured (shape not in this run)"
        if unmeasured:
            return measured, "not measured (" + "; ".join(f"{why} at {', '.join(labels)}"
                                                          for why, labels in unmeasured.items()) + ")"
        has_bar = self.min_gbps is not None or any(x is not None for _, x in self.min_vs)
        return measured, "met" if has_bar else "reported (no target)"

    def _cases(self, rows: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
        """The rows of the case taken for each shape of the target (by shape label), and the shapes with none."""
        mine = [r for r in rows if r["kind"] == "op" and r["name"] == self.op and r["mode"] == self.mode
                and r["dtype"] == self.dtype]
        cases, absent = {}, []
        for s in self.shapes:
            by_label: dict[str, list[dict]] = {}
            for r in mine:
                if s.matches(r["shape"]):
                    by_label.setdefault(r["shape_label"], []).append(r)
            if by_label:
                label = max(by_label, key=lambda k: by_label[k][0]["shape"]["B"])
                cases[label] = by_label[label]
            else:
                absent.append(str(s))
        return cases, absent

    def _worst(self) -> str:
        return "worst " if len(self.shapes) > 1 else ""


def _baselines(names: Sequence[str], short: bool = False) -> str:
    if len(names) == 1:
        return names[0]
    return ("" if short else "the fastest of ") + "/".join(names)


_SDPA_KERNELS = ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn")
_ATTENTION_SHAPES = tuple(_op_shape(N=n, D=d) for d in (64, 80) for n in (197, 257, 577))
# ViT-B/16 at 224: 197 tokens of width 768, MLP hidden 3072; LayerNorm rows B * N ~ 50k (batch 256)
_VIT_B_MLP = (_op_shape(N=197, C=768, hidden=3072),)
_VIT_B_PATCH = (_op_shape(img=224, P=16, E=768, in_chans=3),)
_VIT_B_ROWS = (_op_shape((40_000, 62_500), C=768),)

TARGETS: tuple[Target | OpTarget, ...] = (
    Target("ViT-B/16 at 224, batch 256, inference, bf16 (H200)", "vit_base_patch16_224", "inference", 256,
           "bfloat16", 17000, (("timm:eager", 1.4), ("compiled:timm", 1.15))),
    Target("ViT-B/16 at 224, batch 256, training step, autocast bf16 (H200)", "vit_base_patch16_224", "train", 256,
           "bfloat16", 5500, (("timm:eager", 1.3),)),
    OpTarget("attention forward, bf16, N 197/257/577 x D 64/80 (H200)", "attention", "fwd", _ATTENTION_SHAPES,
             ((_SDPA_KERNELS, 1.3),)),
    OpTarget("attention forward+backward, bf16, N 197/257/577 x D 64/80 (H200)", "attention", "fwd+bwd",
             _ATTENTION_SHAPES, ((_SDPA_KERNELS, 1.2),)),
    OpTarget("layernorm_mlp forward, bf16, ViT-B/16 at 224 (H200)", "layernorm_mlp", "fwd",
             _VIT_B_MLP, ((("eager",), 1.3), (("compiled",), 1.1))),
    OpTarget("layernorm_mlp forward+backward, bf16, ViT-B/16 at 224 (H200)", "layernorm_mlp", "fwd+bwd",
             _VIT_B_MLP, ((("eager",), 1.3), (("compiled",), 1.1))),
    OpTarget("patch_embed forward, bf16, ViT-B/16 at 224 (H200)", "patch_embed", "fwd",
             _VIT_B_PATCH, ((("eager",), 3.0),)),
    OpTarget("patch_embed forward+backward, bf16, ViT-B/16 at 224 (H200)", "patch_embed", "fwd+bwd",
             _VIT_B_PATCH, ((("eager",), None),)),
    OpTarget("layer_norm forward, bf16, ViT-B sizes (B*N ~ 50k rows x 768) (H200)", "layer_norm", "fwd",
             _VIT_B_ROWS, min_gbps=3300),
)


def target_status(results: dict | None) -> list[dict]:
    """Where each target stands in ``results``: 'not measured' (no GPU run, or not these rows; the reason in
    parentheses when the run was on a GPU), 'met', or 'missed' with the gap; the measured figure with the GPU."""
    on_gpu = bool(results) and results["environment"]["device"]["type"] == "cuda"
    out = []
    for t in TARGETS:
        measured, status = t.evaluate(results["rows"], results["environment"]["device"]["name"]) if on_gpu \
            else ("-", "not measured")
        out.append({"target": t.what, "required": t.required(), "measured": measured, "status": status})
    return out
