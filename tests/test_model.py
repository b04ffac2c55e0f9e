"""The model: presets identical to timm's, outputs equal to timm's, wiring through the four ops."""

from __future__ import annotations

from unittest import mock

import pytest
import timm
import torch
from helpers import KERNEL_BACKENDS, autocast_losses

import vit_fast
from vit_fast import ops
from vit_fast.config import PRESETS, ViTConfig, get_config

TIMM_PRESETS = [n for n in PRESETS if n in timm.list_models()]
SMALL = ["vit_tiny_patch16_224", "vit_small_patch32_224", "vit_tiny_patch16_384", "vit_small_patch32_384"]


def test_every_required_timm_preset_is_there():
    required = {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_base_patch16_224",
                "vit_base_patch32_224", "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch16_384",
                "vit_huge_patch14_224"}
    assert required <= set(TIMM_PRESETS)
    assert all(vit_fast.create_model(n, device="meta").pretrained_cfg["architecture"] == n for n in PRESETS)
    assert "vit_tiny_patch4_32" in PRESETS and PRESETS["vit_tiny_patch4_32"].img_size == 32
    assert "vit_nano_patch2_8" in PRESETS and PRESETS["vit_nano_patch2_8"].in_chans == 1


@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_preset_architecture_equals_timm(name):
    """Same parameter names, shapes and count as timm's model, and a strict load of its state dict."""
    with torch.device("meta"):
        t = timm.create_model(name)
        m = vit_fast.create_model(name)
    ts, ms = t.state_dict(), m.state_dict()
    assert {k: v.shape for k, v in ts.items()} == {k: v.shape for k, v in ms.items()}
    assert sum(p.numel() for p in t.parameters()) == sum(p.numel() for p in m.parameters())
    m.load_state_dict(ts, strict=True, assign=True)


@pytest.mark.parametrize("name", SMALL)
def test_from_timm_outputs_equal_timm(name):
    t = timm.create_model(name).eval()
    m = vit_fast.from_timm(t).eval()
    assert m.config.to_dict() == get_config(name).to_dict()
    x = torch.randn(2, 3, *m.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.forward_features(x), t.forward_features(x), atol=1e-5, rtol=1e-5)
    # copies, not shared storage
    assert m.pos_embed.data_ptr() != t.pos_embed.data_ptr()


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", ""])
def test_global_pool_matches_timm(pool):
    t = timm.create_model("vit_tiny_patch16_224", global_pool=pool, img_size=64, depth=2).eval()
    m = vit_fast.from_timm(t).eval()
    assert m.config.global_pool == pool
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t(x), atol=1e-5, rtol=1e-5)


def test_no_class_token_avg_pool_matches_timm():
    t = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", img_size=48, depth=2).eval()
    m = vit_fast.from_timm(t).eval()
    assert m.cls_token is None and m.pos_embed.shape == (1, 9, 192)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t(x), atol=1e-5, rtol=1e-5)


def test_from_timm_rejects_features_vit_fast_lacks():
    t = timm.create_model("vit_tiny_patch16_224", init_values=1e-5, img_size=32, depth=1)
    with pytest.raises(ValueError, match="layer scale"):
        vit_fast.from_timm(t)
    t = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, img_size=32, depth=1)
    assert vit_fast.from_timm(t).config.dynamic_img_size  # converts now (tests/test_dynamic_size.py: outputs)
    t = timm.create_model("vit_tiny_patch16_224", global_pool="map", img_size=32, depth=1)
    with pytest.raises(ValueError, match="attention pooling"):
        vit_fast.from_timm(t)


def test_create_model_overrides_and_unknown_names():
    m = vit_fast.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2)
    assert m.head.out_features == 10 and len(m.blocks) == 2 and m.pos_embed.shape == (1, 5, 192)
    with pytest.raises(ValueError, match="vit_base_patch16_224"):
        vit_fast.create_model("vit_base_patch16_22")
    with pytest.raises(TypeError, match="unknown ViTConfig field"):
        vit_fast.create_model("vit_tiny_patch16_224", embed_dimm=3)
    assert "vit_base_patch16_224" in vit_fast.list_models("base")
    assert vit_fast.list_models() == sorted(PRESETS)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="global_pool"):
        ViTConfig(global_pool="mean")
    c = ViTConfig(img_size=(32, 48), patch_size=8)
    assert c.grid_size == (4, 6) and c.num_patches == 24 and ViTConfig(**c.to_dict()) == c


def test_head_less_model_returns_features():
    m = vit_fast.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(m.head, torch.nn.Identity) and m(x).shape == (2, 192)
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 192)


def test_wrong_image_size_raises():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match="32x32"):
        m(torch.randn(1, 3, 48, 48))


def test_model_runs_through_the_four_ops_with_views_of_qkv():
    """One call per op per place; attention gets the qkv Linear's output as a (B, N, 3, H, D) view (no copy), whole:
    its backward returns that packed gradient."""
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=3).eval()
    calls = {name: 0 for name in ("patch_embed", "attention_packed", "layer_norm", "layernorm_mlp")}
    real = {name: getattr(ops, name) for name in calls}

    def spy(name):
        def f(*args, **kwargs):
            calls[name] += 1
            if name == "attention_packed":
                (qkv,) = args
                assert qkv.shape[2:] == (3, 3, 64) and qkv._base is not None  # a view of the Linear's output
            return real[name](*args, **kwargs)

        return f

    with mock.patch.multiple(vit_fast.model, **{name: spy(name) for name in calls}):  # the model calls these
        m(torch.randn(2, 3, 32, 32))
    assert calls == {"patch_embed": 1, "attention_packed": 3, "layer_norm": 3 + 1, "layernorm_mlp": 3}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    m(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing()
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_training_mode_regularizers_and_init():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=5, drop_rate=0.1,
                              attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2, pos_drop_rate=0.1)
    assert m.blocks[0].drop_path1.__class__.__name__ == "Identity"
    assert m.blocks[-1].drop_path2.p == pytest.approx(0.2)
    x = torch.randn(4, 3, 32, 32)
    m.train()
    a, b = m(x), m(x)
    assert not torch.equal(a, b)  # dropout/drop-path are active
    a.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    # timm's init: truncated normal 0.02 linears, zero biases, tiny class token
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert m.blocks[0].mlp.fc1.bias.abs().max() == 0 and m.cls_token.abs().max() < 1e-4


def test_reset_classifier():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    m.reset_classifier(3)
    assert m.head.out_features == 3 and m.config.num_classes == 3 and not m.head.training
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    m.reset_classifier(0, "")
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5, 192) and m.config.global_pool == ""


def test_batch_zero_returns_empty():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=4).eval()
    assert m(torch.randn(0, 3, 32, 32)).shape == (0, 4)


# ---- the model on the Triton backend (CPU: through the interpreter) ---------------------------------------------


def _tiny(**kw):
    return vit_fast.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                                 num_heads=2, num_classes=5, **kw)


def _triton_runs() -> None:
    reasons = vit_fast.backends.reasons("triton", "attention", (torch.ones(1, 1, 1, 16),) * 3, {})
    if reasons:
        pytest.skip("triton cannot run here: " + "; ".join(reasons))


def test_triton_model_logits_and_every_gradient_match_the_reference():
    from vit_fast.tolerance import assert_close

    _triton_runs()
    m = _tiny()
    x = torch.randn(3, 3, 16, 16)
    results = {}
    for backend in ("reference", "triton"):
        m.zero_grad()
        with vit_fast.set_backend(backend):
            out = m(x)
            out.square().mean().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    ref_out, ref_grads = results["reference"]
    out, grads = results["triton"]
    assert_close(out, ref_out, ref_out, name="logits")
    for n, g in grads.items():
        assert_close(g, ref_grads[n], ref_grads[n], name=n)


@pytest.mark.slow  # 8 AdamW steps under the interpreter: 45 s, most of the plain run's budget for one test
def test_triton_model_trains_end_to_end():
    _triton_runs()
    torch.manual_seed(0)
    m = _tiny()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    with vit_fast.set_backend("triton"):
        for _ in range(8):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.cuda
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_bf16_training_loss_curve_matches_the_reference(backend):
    """A few AdamW steps of a ViT-S-shaped model under bf16 autocast: the loss curve follows the reference's."""
    x = torch.randn(16, 3, 64, 64, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    probe = torch.empty(1, 6, 17, 64, device="cuda", dtype=torch.bfloat16)
    why = vit_fast.backends.reasons(backend, "attention", (probe, probe, probe), {})
    if why:
        pytest.skip(f"{backend} cannot run here: " + "; ".join(why))
    curves = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        m = vit_fast.create_model("vit_small_patch16_224", img_size=64, depth=4, num_classes=10).cuda()
        curves[name] = autocast_losses(m, x, y, 8, name)
    ref, got = torch.tensor(curves["reference"]), torch.tensor(curves[backend])
    assert torch.isfinite(got).all() and got[-1] < got[0], curves
    assert ((got - ref).abs() <= 0.05 * ref.abs() + 0.02).all(), curves
