"""Dynamic image sizes (timm's ``dynamic_img_size`` / ``dynamic_img_pad``): outputs equal timm's on the same
weights at sizes other than the model's, the resampled position embedding is timm's numerically, it is cached
per grid and dropped when the parameter changes, gradients still reach it in training, and FX, torch.compile
and bad sizes behave."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_nested_close

import vit_fast
from vit_fast import pos_embed as pe_mod
from vit_fast.model import _dynamic_pos_embed
from vit_fast.pos_embed import cached_grids, cached_resample_pos_embed, resample_pos_embed

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402

TINY = dict(depth=2, img_size=32)  # vit_tiny at 2x2 patches of 16: seconds on CPU
LAYOUTS = {  # the prefix-token layouts timm's ViT has
    "class": {},
    "no_class": dict(class_token=False, global_pool="avg"),
    "registers": dict(reg_tokens=2),
    "registers_no_embed_class": dict(reg_tokens=3, no_embed_class=True),
    "no_class_registers_no_embed_class": dict(class_token=False, reg_tokens=2, global_pool="avg",
                                              no_embed_class=True),
}


def _pair(pad: bool = False, **kw):
    """timm's dynamic model and vit_fast's with its weights (the position embedding made far from zero, so a
    wrong resampling shows), both in eval mode."""
    t = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, dynamic_img_pad=pad, **TINY, **kw).eval()
    with torch.no_grad():
        t.pos_embed.normal_()
    m = vit_fast.create_model("vit_tiny_patch16_224", dynamic_img_size=True, dynamic_img_pad=pad, **TINY, **kw)
    m.load_state_dict(t.state_dict())
    return t, m.eval()




def _table(m, hw):
    """The position embedding ``m`` uses for (hw) images."""
    pe = m.patch_embed
    prefix = 0 if m.no_embed_class else m.num_prefix_tokens
    return _dynamic_pos_embed(torch.empty(1, 3, *hw), m.pos_embed, pe.grid_size, pe.patch_size, prefix,
                              pe.dynamic_img_pad)


# ---- timm's numerics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resample_pos_embed_is_timms_bit_for_bit(prefix, dtype):
    for old, new in [((4, 4), (6, 3)), ((4, 4), (2, 2)), ((3, 5), (7, 4)), ((3, 5), (3, 5)), ((4, 4), (4, 4))]:
        table = torch.randn(1, prefix + old[0] * old[1], 8).to(dtype)
        ours = resample_pos_embed(table, new, old, prefix)
        assert torch.equal(ours, resample_abs_pos_embed(table, list(new), list(old), prefix))
        assert ours.dtype == dtype and (ours is table) == (old == new)  # timm returns the table itself
    table = torch.randn(1, prefix + 16, 8).to(dtype)  # old grid implied (square), as for checkpoints
    assert torch.equal(resample_pos_embed(table, (5, 3), None, prefix),
                       resample_abs_pos_embed(table, [5, 3], None, prefix))
    assert vit_fast.resample_pos_embed is resample_pos_embed
    assert vit_fast.weights.resample_pos_embed is resample_pos_embed
    assert vit_fast.model.resample_pos_embed is resample_pos_embed


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_outputs_equal_timm_at_other_sizes(layout):
    t, m = _pair(**LAYOUTS[layout])
    n = m.num_prefix_tokens
    for hw in [(32, 32), (48, 64), (80, 16), (16, 16)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert_nested_close(m(x), t(x))
            assert_nested_close(m.forward_features(x), t.forward_features(x))
            for fmt in ("NCHW", "NLC"):
                kw = dict(indices=[0, 1], output_fmt=fmt, return_prefix_tokens=bool(n))
                assert_nested_close(m.forward_intermediates(x, **kw), t.forward_intermediates(x, **kw))


@pytest.mark.parametrize("layout", ["class", "registers_no_embed_class"])
def test_padding_equals_timm_and_zero_padded_images(layout):
    t, m = _pair(pad=True, **LAYOUTS[layout])
    for hw in [(33, 50), (17, 17), (32, 48)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            out = m(x)
            assert_nested_close(out, t(x))
            grid = (-(-hw[0] // 16), -(-hw[1] // 16))
            padded = torch.zeros(2, 3, grid[0] * 16, grid[1] * 16)
            padded[..., : hw[0], : hw[1]] = x  # right/bottom zeros, as timm pads
            assert_nested_close(out, m(padded))
            feats = m.forward_intermediates(x, indices=1, intermediates_only=True)
            assert feats[0].shape == (2, 192, *grid)
            assert_nested_close(feats, t.forward_intermediates(x, indices=1, intermediates_only=True))


def test_padded_dynamic_model_takes_an_image_size_the_patches_do_not_divide():
    t = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=40, dynamic_img_size=True,
                          dynamic_img_pad=True).eval()
    m = vit_fast.from_timm(t)
    assert m.config.grid_size == (2, 2) and m.config.dynamic_img_pad and m.config.dynamic_img_size
    x = torch.randn(1, 3, 40, 40)  # padded to 48: a 3x3 grid resampled from pos_embed's 2x2
    with torch.no_grad():
        assert_nested_close(m(x), t(x))


def test_sizes_the_patches_do_not_divide_raise_without_padding():
    m = vit_fast.create_model("vit_tiny_patch16_224", dynamic_img_size=True, **TINY).eval()
    with pytest.raises(ValueError, match=r"33x48.*patch size 16x16.*dynamic_img_pad"):
        m(torch.randn(1, 3, 33, 48))
    static = vit_fast.create_model("vit_tiny_patch16_224", **TINY).eval()
    with pytest.raises(ValueError, match="32x32"):  # a fixed-size model still wants its own size
        static(torch.randn(1, 3, 48, 48))
    pad_only = vit_fast.create_model("vit_tiny_patch16_224", dynamic_img_pad=True, **TINY).eval()
    with pytest.raises(ValueError, match="dynamic_img_size=True takes any size"):  # as timm: pad alone is strict
        pad_only(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        vit_fast.create_model("vit_tiny_patch16_224", img_size=40, dynamic_img_size=True)


def test_from_timm_and_create_model_carry_the_options():
    t, _ = _pair(pad=True)
    m = vit_fast.from_timm(t)
    assert m.config.dynamic_img_size and m.config.dynamic_img_pad
    assert m.patch_embed.dynamic_img_size and m.patch_embed.dynamic_img_pad
    assert m.config.replace(depth=1).dynamic_img_size  # replace (set_input_size, pruning) keeps them


# ---- the cache ------------------------------------------------------------------------------------------------


def test_cache_hits_per_grid_and_returns_the_parameter_at_its_own_grid():
    _, m = _pair()
    with torch.no_grad():
        a = _table(m, (48, 64))
        assert _table(m, (48, 64)) is a  # the second call at a grid is a hit: the same table
        assert _table(m, (80, 16)) is not a
        assert _table(m, (32, 32)) is m.pos_embed  # the model's own grid: the parameter itself, nothing cached
        m(torch.randn(1, 3, 48, 64))
        assert _table(m, (48, 64)) is a  # the forward uses the same cache
    assert sorted(cached_grids(m.pos_embed)) == [(3, 4), (5, 1)]
    assert torch.equal(a, resample_pos_embed(m.pos_embed, (3, 4), (2, 2), 1))


def test_inference_mode_tables_are_kept_apart():
    _, m = _pair()
    with torch.inference_mode():
        a = _table(m, (48, 48))
    with torch.no_grad():
        b = _table(m, (48, 48))
    assert a.is_inference() and not b.is_inference()
    m.pos_embed.requires_grad_(False)  # a frozen table in a training step: no inference tensor saved for backward
    m.train()
    m(torch.randn(1, 3, 48, 48)).sum().backward()


def test_cache_is_dropped_after_an_optimizer_step_and_gradients_reach_pos_embed():
    t, m = _pair()
    t.train(), m.train()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        stale = _table(m, (48, 64))
    assert_nested_close(m(x), t(x))
    m(x).square().mean().backward()
    t(x).square().mean().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0
    assert_nested_close(m.pos_embed.grad, t.pos_embed.grad)
    with torch.enable_grad():
        live = _table(m, (48, 64))
    assert live.requires_grad and live is not stale  # training: no cache, the table carries gradients
    torch.optim.SGD(m.parameters(), lr=1.0).step()  # in place: bumps pos_embed's version counter
    with torch.no_grad():
        fresh = _table(m, (48, 64))
    assert fresh is not stale and not torch.equal(fresh, stale)
    assert torch.equal(fresh, resample_pos_embed(m.pos_embed, (3, 4), (2, 2), 1))


def test_cache_is_dropped_after_loading_weights():
    _, m = _pair()
    with torch.no_grad():
        stale = _table(m, (48, 48))
    other = {k: v + 1 if k == "pos_embed" else v for k, v in m.state_dict().items()}
    m.load_state_dict(other)
    with torch.no_grad():
        after_load = _table(m, (48, 48))
    torch.testing.assert_close(after_load, stale + 1)  # bicubic weights sum to 1: the shift carries through
    assert torch.equal(after_load, resample_pos_embed(m.pos_embed, (3, 3), (2, 2), 1))
    vit_fast.load_checkpoint(m, {k: v - 1 if k == "pos_embed" else v for k, v in other.items()})
    with torch.no_grad():
        after_checkpoint = _table(m, (48, 48))
    torch.testing.assert_close(after_checkpoint, stale)
    assert after_checkpoint is not stale


def test_cache_follows_to_dtype_and_round_trips():
    _, m = _pair()
    with torch.no_grad():
        f32 = _table(m, (48, 48))
        m.to(torch.float64)
        f64 = _table(m, (48, 48))
        assert f64.dtype == torch.float64
        assert torch.equal(f64, resample_pos_embed(m.pos_embed, (3, 3), (2, 2), 1))
        m.to(torch.bfloat16).to(torch.float32)  # values rounded; the float32 storage may reuse an old address
        back = _table(m, (48, 48))
        assert back.dtype == torch.float32 and not torch.equal(back, f32)
        assert torch.equal(back, resample_pos_embed(m.pos_embed, (3, 3), (2, 2), 1))


def test_set_input_size_drops_the_old_parameters_tables():
    _, m = _pair()
    old = m.pos_embed
    with torch.no_grad():
        _table(m, (64, 64))
    assert cached_grids(old) == [(4, 4)]
    m.set_input_size(img_size=48)
    assert cached_grids(old) == [] and m.pos_embed is not old
    with torch.no_grad():
        assert _table(m, (64, 64)) is not None and cached_grids(m.pos_embed) == [(4, 4)]
        assert _table(m, (48, 48)) is m.pos_embed
    key = id(m.pos_embed)
    del m
    assert key not in pe_mod._CACHE  # the entry goes with its parameter


def test_cache_keeps_a_bounded_number_of_grids():
    table = torch.randn(1, 5, 8)
    with torch.no_grad():
        for i in range(pe_mod.MAX_GRIDS + 4):
            cached_resample_pos_embed(table, (3, i + 3), (2, 2), 1)
    assert len(cached_grids(table)) == pe_mod.MAX_GRIDS and (3, 3) not in cached_grids(table)
    pe_mod.clear_pos_embed_cache(table)
    assert cached_grids(table) == []


# ---- tracing and compiling ------------------------------------------------------------------------------------


def test_fx_symbolic_trace_runs_any_size():
    _, m = _pair(pad=True, reg_tokens=1)
    gm = torch.fx.symbolic_trace(m)
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert _dynamic_pos_embed in leaves  # the size logic runs on real shapes, inside a leaf
    with torch.no_grad():
        for hw in [(32, 32), (48, 64), (33, 20)]:
            x = torch.randn(2, 3, *hw)
            assert_nested_close(gm(x), m(x))


def test_torch_compile_fullgraph_at_a_fixed_size_skips_the_cache():
    torch._dynamo.reset()
    _, m = _pair()
    x = torch.randn(2, 3, 48, 64)
    compiled = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x)
        assert cached_grids(m.pos_embed) == []  # the table was computed inside the graph
        assert_nested_close(out, m(x))
