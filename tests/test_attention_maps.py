"""vit_fast.attention_maps (in vit_fast.attn_maps) against softmax(q k^T * scale) of the model's own q and k."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from helpers import KERNEL_BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vit_fast
from vit_fast import attn_maps as am
from vit_fast.tolerance import assert_close

NANO = "vit_nano_patch2_8"  # 4 blocks, 4 heads of 16, 2x2 patches of 8x8 grayscale: N = 1 + 16


def _model(**overrides: object) -> torch.nn.Module:
    try:
        return vit_fast.create_model(NANO, **overrides).eval()
    except TypeError as e:
        pytest.skip(f"this model does not take {overrides}: {e}")


@contextlib.contextmanager
def _own_qk(model: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Each block's (q, k, scale), (B, H, N, D), caught during the forwards in the block by the test's own hooks."""
    caught: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def grab(attn):
        def hook(_m, _i, qkv):
            B, N, _ = qkv.shape
            q, k, _v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            caught.append((q.detach().clone(), k.detach().clone(), float(attn.scale)))
        return hook

    handles = [b.attn.qkv.register_forward_hook(grab(b.attn)) for b in model.blocks]
    try:
        yield caught
    finally:
        for h in handles:
            h.remove()


def _explicit(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.softmax(q.to(dtype) @ k.to(dtype).transpose(-2, -1) * scale, dim=-1)  # (B, H, N, N)


def _probs(model, images, dtype):
    with _own_qk(model) as caught, torch.no_grad():
        model(images)
    return [_explicit(q, k, s, dtype) for q, k, s in caught]


def _naive_rollout(probs: list[torch.Tensor], fusion: str, discard: float, cls: bool, prefix: int,
                   grid: tuple[int, int]) -> torch.Tensor:
    """Abnar & Zuidema's rollout, one image and one layer at a time, by plain loops."""
    B, _H, N, _ = probs[0].shape
    out = []
    for b in range(B):
        joint = torch.eye(N, dtype=probs[0].dtype)
        for p in probs:
            heads = p[b]
            a = {"mean": heads.mean(0), "max": heads.max(0).values, "min": heads.min(0).values}[fusion].clone()
            flat = a.view(-1)
            for i in sorted(range(N * N), key=lambda i: flat[i].item())[: int(N * N * discard)]:
                flat[i] = 0.0
            a = a + torch.eye(N, dtype=a.dtype)
            for i in range(N):
                a[i] = a[i] / a[i].sum()
            joint = a @ joint
        row = joint[0] if cls else joint[prefix:].mean(0)
        out.append(row[prefix:].reshape(grid))
    return torch.stack(out)


def _triton_or_skip() -> None:
    reasons = vit_fast.backends.reasons("triton", "attention", (torch.ones(1, 1, 1, 16),) * 3, {})
    if reasons:
        pytest.skip("triton cannot run here: " + "; ".join(reasons))


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("reference", torch.bfloat16),
                                           ("triton", torch.float32)])
def test_maps_equal_the_explicit_softmax_of_the_models_own_q_and_k(backend, dtype):
    if backend == "triton":
        _triton_or_skip()
    model = _model().to(dtype)
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    with vit_fast.set_backend(backend):  # few forwards: each one is slow in the Triton interpreter
        with _own_qk(model) as caught:  # the oracle's q and k, from the same forward as the maps
            logits, full = am.forward_with_attention_maps(model, x, method="full")
        with torch.no_grad():
            assert torch.equal(logits, model(x)), "the maps' forward must be the model's own forward"
        cls = am.attention_maps(model, x, method="cls")
    oracle = [_explicit(q, k, s, torch.float64) for q, k, s in caught]
    same = [_explicit(q, k, s, dtype) for q, k, s in caught]

    assert full.shape == (2, 4, 4, 17, 17) and full.dtype == torch.float32
    assert cls.shape == (2, 4, 4, 4, 4)
    for layer in range(4):
        assert_close(full[:, layer], same[layer], oracle[layer], name=f"full layer {layer}")
        assert_close(cls[:, layer], same[layer][:, :, 0, 1:].reshape(2, 4, 4, 4),
                     oracle[layer][:, :, 0, 1:].reshape(2, 4, 4, 4), name=f"cls layer {layer}")
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 4, 4, 17), rtol=0, atol=1e-5)
    # what the class token's row leaves out of the map is exactly its weight on itself
    torch.testing.assert_close(cls.sum((-1, -2)) + full[:, :, :, 0, 0], torch.ones(2, 4, 4), rtol=0, atol=1e-5)
    if backend == "reference":  # rollout works from the same rows whatever computed the forward
        rollout = am.attention_maps(model, x, method="rollout", head_fusion="max", discard_ratio=0.2)
        assert_close(rollout, _naive_rollout(same, "max", 0.2, True, 1, (4, 4)),
                     _naive_rollout(oracle, "max", 0.2, True, 1, (4, 4)), name="rollout")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_maps_on_the_gpu_backends_in_bf16(backend):
    q = torch.ones(1, 3, 65, 64, device="cuda", dtype=torch.bfloat16)
    reasons = vit_fast.backends.reasons(backend, "attention", (q, q, q), {})
    if reasons:
        pytest.skip(f"{backend} cannot run here: " + "; ".join(reasons))
    # 3 heads of 64 (a head dim every kernel takes), 64 patches + class token
    model = vit_fast.create_model("vit_tiny_patch4_32", depth=2).to("cuda", torch.bfloat16).eval()
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with vit_fast.set_backend(backend):
        with _own_qk(model) as caught:
            logits, full = am.forward_with_attention_maps(model, x, method="full")
        cls = am.attention_maps(model, x, method="cls")
        rollout = am.attention_maps(model, x, method="rollout")
    oracle = [_explicit(q.cpu(), k.cpu(), s, torch.float64) for q, k, s in caught]
    same = [_explicit(q.cpu(), k.cpu(), s, torch.bfloat16) for q, k, s in caught]
    assert logits.shape == (4, 100) and full.shape == (4, 2, 3, 65, 65) and cls.shape == (4, 2, 3, 8, 8)
    for layer in range(2):
        assert_close(full[:, layer].cpu(), same[layer], oracle[layer], name=f"full layer {layer}")
        assert_close(cls[:, layer].cpu(), same[layer][:, :, 0, 1:].reshape(4, 3, 8, 8),
                     oracle[layer][:, :, 0, 1:].reshape(4, 3, 8, 8), name=f"cls layer {layer}")
    assert_close(rollout.cpu(), _naive_rollout(same, "mean", 0.0, True, 1, (8, 8)),
                 _naive_rollout(oracle, "mean", 0.0, True, 1, (8, 8)), name="rollout")


@pytest.mark.parametrize("fusion,discard,layers", [("mean", 0.0, None), ("min", 0.5, [1, -1]),
                                                   ("max", 0.9, 2)])
def test_rollout_equals_a_direct_loop_implementation(fusion, discard, layers):
    model = _model()
    x = torch.randn(3, 1, 8, 8)
    out = am.attention_maps(model, x, method="rollout", head_fusion=fusion, discard_ratio=discard, layers=layers)
    chosen = [0, 1, 2, 3] if layers is None else sorted({i % 4 for i in ([layers] if isinstance(layers, int)
                                                                          else layers)})
    probs64, probs32 = ([p for i, p in enumerate(_probs(model, x, dt)) if i in chosen]
                        for dt in (torch.float64, torch.float32))
    assert_close(out, _naive_rollout(probs32, fusion, discard, True, 1, (4, 4)),
                 _naive_rollout(probs64, fusion, discard, True, 1, (4, 4)), name="rollout")
    if discard == 0.0:  # without dropped weights every row of the product is a distribution
        assert float(out.sum((-1, -2)).max()) < 1.0


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor every aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _square(shapes: list[tuple[int, ...]], n: int) -> int:
    return sum(len(s) >= 2 and s[-2:] == (n, n) for s in shapes)


@pytest.mark.parametrize("class_token", [True, False])
def test_cls_maps_never_make_an_n_by_n_matrix(class_token, monkeypatch):
    # N = 16 without the class token: 2 heads of 32, so that no (N, D) tensor looks (N, N)
    model = _model() if class_token else _model(class_token=False, global_pool="avg", num_heads=2)
    n, heads = (17, 4) if class_token else (16, 2)
    x = torch.randn(2, 1, 8, 8)
    # rows in chunks of 3: a class-token-free model averages its query rows without holding them all at once
    monkeypatch.setattr(am, "_CHUNK_ELEMENTS", 2 * heads * 3 * n)
    with _OutputShapes() as plain, torch.no_grad():
        model(x)
    with _OutputShapes() as cls:
        maps = am.attention_maps(model, x, method="cls")
    with _OutputShapes() as full:
        am.attention_maps(model, x, method="full")
    assert _square(cls.shapes, n) == _square(plain.shapes, n)  # the hooks added none
    assert _square(full.shapes, n) >= _square(plain.shapes, n) + 4  # (and the check sees them when there)

    # what each hook keeps: (B, H, N) per layer
    recorder = am.AttentionRecorder("cls", query_row=0 if class_token else None, first_patch=1 if class_token else 0)
    handles = [b.attn.qkv.register_forward_hook(recorder.hook(b.attn, i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert sorted(recorder.rows) == [0, 1, 2, 3] and recorder.joint is None
    assert all(r.shape == (2, heads, n) for r in recorder.rows.values())

    for layer, probs in enumerate(_probs(model, x, torch.float64)):
        rows = probs[:, :, 0] if class_token else probs.mean(dim=2)  # (B, H, N)
        expected = rows[..., 1:] if class_token else rows
        torch.testing.assert_close(maps[:, layer], expected.reshape(2, heads, 4, 4).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides,prefix,cls", [({"class_token": False, "global_pool": "avg"}, 0, False),
                                                 ({"reg_tokens": 2}, 3, True)], ids=["no-class-token", "registers"])
def test_models_without_class_token_or_with_registers(overrides, prefix, cls):
    model = _model(**overrides)
    assert model.num_prefix_tokens == prefix
    x = torch.randn(2, 1, 8, 8)
    probs = _probs(model, x, torch.float64)
    out = am.attention_maps(model, x, method="rollout", layers=[0, 3])
    expected = _naive_rollout([probs[0], probs[3]], "mean", 0.0, cls, prefix, (4, 4))
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=1e-6)
    cls_maps = am.attention_maps(model, x, method="cls", layers=[-1])
    rows = probs[3][:, :, 0] if cls else probs[3].mean(dim=2)  # (B, H, N)
    torch.testing.assert_close(cls_maps[:, 0], rows[..., prefix:].reshape(2, 4, 4, 4).float(), rtol=0, atol=1e-6)
    full = am.attention_maps(model, x, method="full", layers=-1)
    assert full.shape == (2, 1, 4, 16 + prefix, 16 + prefix)


def test_train_mode_is_restored_and_hooks_removed():
    model = _model()
    model.train()
    model.head.eval()
    am.attention_maps(model, torch.randn(1, 1, 8, 8), layers=[0])
    assert model.training and model.blocks[0].training and not model.head.training
    assert all(not b.attn.qkv._forward_hooks for b in model.blocks)


@pytest.mark.parametrize("kwargs,argument", [
    ({"method": "attention"}, "method"),
    ({"head_fusion": "median"}, "head_fusion"),
    ({"discard_ratio": 1.0}, "discard_ratio"),
    ({"discard_ratio": -0.1}, "discard_ratio"),
    ({"layers": 4}, "layers"),
    ({"layers": [0, -4]}, "layers"),
    ({"layers": []}, "layers"),
    ({"layers": "0"}, "layers"),
    ({"max_elements": 0}, "max_elements"),
    ({"method": "full", "max_elements": 100}, "max_elements"),
    ({"method": "rollout", "max_elements": 100}, "max_elements"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    model = _model()
    with pytest.raises(ValueError, match=argument):
        am.attention_maps(model, torch.randn(2, 1, 8, 8), **kwargs)
    assert all(not b.attn.qkv._forward_hooks for b in model.blocks)


def test_bad_model_or_images_raise_value_error():
    with pytest.raises(ValueError, match="model"):
        am.attention_maps(torch.nn.Linear(4, 4), torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="images"):
        am.attention_maps(_model(), torch.randn(1, 8, 8))


def test_full_limit_counts_the_result():
    model = _model()
    x = torch.randn(2, 1, 8, 8)
    need = 2 * 4 * 4 * 17 * 17
    assert am.attention_maps(model, x, method="full", max_elements=need).shape == (2, 4, 4, 17, 17)
    with pytest.raises(ValueError, match=f"{need} elements"):
        am.attention_maps(model, x, method="full", max_elements=need - 1)
