"""Attention maps of a ViT, taken from its normal (fused, fast) forward.

The fused attention kernels never hold the N x N probability matrix, so the maps are recomputed beside them: a
forward hook on each requested ``blocks[i].attn.qkv`` Linear sees the packed q, k, v the kernel is about to
read, recomputes the probabilities of just the query rows the method needs (``p = exp(q.k * scale - lse)``,
i.e. a softmax over one row of logits), keeps those and lets the rest go. The model runs on whatever backend
it runs on; nothing switches it to a slow path, and its logits come from the same forward.

Memory: ``cls`` keeps (B, H, N) per layer, never an N x N matrix per head (models without a class token
average the rows in chunks, so the same holds). ``rollout`` keeps two (B, N, N) matrices (the running product
and the current layer's head-fused one); ``full`` returns (B, L, H, N, N). Both carry a size limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

METHODS: tuple[str, ...] = ("cls", "rollout", "full")
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")
# Elements of the tensors that cannot be avoided: (B, L, H, N, N) for "full", one (B, N, N) for "rollout".
# 2**26 float32 elements are 256 MiB.
FULL_MAX_ELEMENTS = 2**26
ROLLOUT_MAX_ELEMENTS = 2**26
# Rows of probabilities are made in chunks of at most this many elements (B * H * rows * N), so even the
# row-mean of a class-token-free model or a rollout layer never holds (B, H, N, N) at once.
_CHUNK_ELEMENTS = 2**22


def attention_maps(
    model: nn.Module,
    images: torch.Tensor,
    *,
    layers: int | Sequence[int] | None = None,
    method: str = "cls",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    max_elements: int | None = None,
) -> torch.Tensor:
    """Attention maps of ``model`` on ``images`` (B, C, H, W), computed alongside its fast forward.

    Args:
        model: a :class:`vit_fast.VisionTransformer` (or any model with ``blocks[i].attn.qkv`` /
            ``num_heads`` / ``head_dim`` / ``scale``, ``patch_embed.grid_size`` and ``num_prefix_tokens``).
        images: (B, C, H, W) at the model's resolution, preprocessed as the model expects.
        layers: block indices (negative count from the end), an int for one block; default every block.
        method: ``cls``: (B, L, H, grid_h, grid_w), the attention of the class token to every patch in each
            requested layer and head (without a class token: the mean over the patch query rows). The values
            are the probabilities themselves: a row's mass on the prefix tokens is not in the map.
            ``rollout``: (B, grid_h, grid_w), attention rollout (Abnar & Zuidema 2020) through the requested
            layers: heads fused by ``head_fusion``, the lowest ``discard_ratio`` of each fused matrix set to 0,
            the identity added for the residual path, rows renormalized, the layers multiplied in order; the
            class token's row of the product (the mean of the patch rows without a class token), patch
            columns. ``full``: (B, L, H, N, N), every probability, tokens in the model's order (prefix
            tokens first).
        head_fusion: ``mean``, ``max`` or ``min`` over the heads (``rollout`` only).
        discard_ratio: in [0, 1): the fraction of lowest fused weights dropped per layer (``rollout`` only).
        max_elements: raises the size limit of ``full`` (elements of the result, default
            :data:`FULL_MAX_ELEMENTS`) or of ``rollout`` (elements of one (B, N, N) matrix, default
            :data:`ROLLOUT_MAX_ELEMENTS`).

    Returns:
        float32 maps on the images' device. Probability rows of ``full`` sum to 1.
    """
    return forward_with_attention_maps(model, images, layers=layers, method=method, head_fusion=head_fusion,
                                       discard_ratio=discard_ratio, max_elements=max_elements)[1]


def forward_with_attention_maps(model: nn.Module, images: torch.Tensor, *, layers: int | Sequence[int] | None = None,
                                method: str = "cls", head_fusion: str = "mean", discard_ratio: float = 0.0,
                                max_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(images), maps)`` from one forward in eval mode, without gradients; arguments as
    :func:`attention_maps`. The model's train/eval state is restored afterwards."""
    inner = getattr(model, "_orig_mod", model)  # a torch.compile'd module holds its model here
    blocks = blocks_of(inner)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}; got {head_fusion!r}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be a number in [0, 1); got {discard_ratio!r}")
    if max_elements is not None and (isinstance(max_elements, bool) or not isinstance(max_elements, int)
                                     or max_elements < 1):
        raise ValueError(f"max_elements must be a positive int or None; got {max_elements!r}")
    chosen = _resolve_layers(layers, len(blocks))
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor; got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")

    feat_size = getattr(inner.patch_embed, "dynamic_feat_size", None)  # a dynamic-size model's grid follows the images
    grid = tuple(int(g) for g in (feat_size(tuple(images.shape[-2:])) if feat_size else inner.patch_embed.grid_size))
    prefix = int(getattr(inner, "num_prefix_tokens", 0))
    has_cls = getattr(inner, "cls_token", None) is not None
    tokens = prefix + grid[0] * grid[1]
    batch = images.shape[0]
    heads = [int(blocks[i].attn.num_heads) for i in chosen]
    if method == "full":
        size = batch * tokens * tokens * sum(heads)
        _check_size("full", size, max_elements or FULL_MAX_ELEMENTS,
                    f"B*L*H*N*N = {batch}*{len(chosen)}*{heads[0]}*{tokens}*{tokens}")
    elif method == "rollout":
        _check_size("rollout", batch * tokens * tokens, max_elements or ROLLOUT_MAX_ELEMENTS,
                    f"B*N*N = {batch}*{tokens}*{tokens} per matrix")

    recorder = AttentionRecorder(method, query_row=0 if has_cls else None, first_patch=prefix,
                                 head_fusion=head_fusion, discard_ratio=float(discard_ratio))
    handles = [blocks[i].attn.qkv.register_forward_hook(recorder.hook(blocks[i].attn, i)) for i in chosen]
    modes = {m: m.training for m in inner.modules()}
    try:
        inner.eval()
        with torch.no_grad():
            logits = model(images)
    finally:
        for h in handles:
            h.remove()
        for m, was_training in modes.items():
            m.training = was_training
    missing = [i for i in chosen if i not in recorder.seen]
    if missing:
        raise RuntimeError(f"the forward did not call blocks[{missing[0]}].attn.qkv as a module: attention maps "
                           "are taken from its output, so the model's Attention must call self.qkv(x)")
    if recorder.tokens != tokens:
        raise RuntimeError(f"the blocks saw {recorder.tokens} tokens; the model's grid {grid} and "
                           f"{prefix} prefix tokens make {tokens}")
    return logits, recorder.result(chosen, grid)


def blocks_of(model: nn.Module) -> Sequence[nn.Module]:
    """``model.blocks`` when the maps can be taken from it (each block's ``attn.qkv`` a Linear, a
    ``patch_embed``), else a ValueError naming the model's type."""
    blocks = getattr(model, "blocks", None)
    ok = (blocks is not None and len(blocks) > 0 and hasattr(model, "patch_embed")
          and all(isinstance(getattr(getattr(b, "attn", None), "qkv", None), nn.Linear) for b in blocks))
    if not ok:
        raise ValueError(f"model must be a ViT with blocks[i].attn.qkv Linear layers and a patch_embed "
                         f"(a vit_fast.VisionTransformer); got {type(model).__name__}")
    return blocks


def _resolve_layers(layers: int | Sequence[int] | None, depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"layers must be None, an int or a sequence of ints; got {layers!r}") from None
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"layers must be None, an int or a non-empty sequence of ints; got {layers!r}")
    bad = [i for i in items if not -depth <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model of {depth} blocks (valid: {-depth}..{depth - 1})")
    chosen = sorted({i % depth for i in items})
    if len(chosen) != len(items):
        raise ValueError(f"layers name a block more than once: {layers!r}")
    return chosen


def _check_size(method: str, size: int, limit: int, what: str) -> None:
    if size > limit:
        raise ValueError(f"method={method!r} needs {what} = {size} elements, over the limit of {limit}: use "
                         "fewer images or layers, method='cls' (no N x N matrix), or a larger max_elements")


def fuse_heads(p: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(B, H, ...) probabilities -> (B, ...) by ``mean``, ``max`` or ``min`` over the heads."""
    if head_fusion == "mean":
        return p.mean(dim=1)
    if head_fusion == "max":
        return p.amax(dim=1)
    if head_fusion == "min":
        return p.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}; got {head_fusion!r}")


def _softmax_rows(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, R, D) query rows and (B, H, N, D) keys -> (B, H, R, N) fp32 probabilities,
    ``exp(q.k * scale - lse)`` with each row's own log-sum-exp."""
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, R, N)
    return torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))


def _row_chunks(batch: int, heads: int, tokens: int, start: int = 0) -> range:
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * tokens))
    return range(start, tokens, step)


class AttentionRecorder:
    """Forward hooks on ``attn.qkv`` that keep, per layer, only what ``method`` needs.

    ``rows[layer]``: (B, H, N) for ``cls`` (the class token's row, or the mean of the query rows from
    ``first_patch`` on when ``query_row`` is None), (B, H, N, N) for ``full``; for ``rollout`` the running
    product ``joint`` (B, N, N) is updated layer by layer and nothing is kept per layer.
    """

    def __init__(self, method: str, *, query_row: int | None, first_patch: int, head_fusion: str = "mean",
                 discard_ratio: float = 0.0) -> None:
        self.method, self.query_row, self.first_patch = method, query_row, first_patch
        self.head_fusion, self.discard_ratio = head_fusion, discard_ratio
        self.rows: dict[int, torch.Tensor] = {}
        self.joint: torch.Tensor | None = None
        self.seen: list[int] = []
        self.tokens: int | None = None

    def hook(self, attn: nn.Module, layer: int) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        heads, head_dim, scale = int(attn.num_heads), int(attn.head_dim), float(attn.scale)

        def on_qkv(_module: nn.Module, _inputs: tuple, qkv: torch.Tensor) -> None:
            B, N, _ = qkv.shape
            q, k = qkv.detach().reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[:2]  # each (B, H, N, D)
            self.seen.append(layer)
            self.tokens = N
            if self.method == "cls":
                self.rows[layer] = self._query_rows(q, k, scale)
            elif self.method == "full":
                self.rows[layer] = _softmax_rows(q, k, scale)
            else:
                self._rollout_step(q, k, scale)

        return on_qkv

    def _query_rows(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, H, N): the class token's probabilities, or the mean over the patch query rows."""
        if self.query_row is not None:
            return _softmax_rows(q[:, :, self.query_row : self.query_row + 1], k, scale)[:, :, 0]
        B, H, N, _ = q.shape
        total = q.new_zeros((B, H, N), dtype=torch.float32)
        chunks = _row_chunks(B, H, N, self.first_patch)
        for r0 in chunks:
            total += _softmax_rows(q[:, :, r0 : r0 + chunks.step], k, scale).sum(dim=2)
        return total / (N - self.first_patch)

    def _rollout_step(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        B, H, N, _ = q.shape
        fused = q.new_empty((B, N, N), dtype=torch.float32)
        chunks = _row_chunks(B, H, N)
        for r0 in chunks:
            fused[:, r0 : r0 + chunks.step] = fuse_heads(_softmax_rows(q[:, :, r0 : r0 + chunks.step], k, scale),
                                                         self.head_fusion)
        drop = int(N * N * self.discard_ratio)
        if drop:
            flat = fused.view(B, N * N)
            flat.scatter_(1, flat.topk(drop, dim=1, largest=False).indices, 0.0)
        fused.diagonal(dim1=1, dim2=2).add_(1.0)  # the residual path carries each token to itself
        fused /= fused.sum(dim=-1, keepdim=True)
        self.joint = fused if self.joint is None else torch.bmm(fused, self.joint)

    def result(self, layers: Sequence[int], grid: tuple[int, int]) -> torch.Tensor:
        """The maps of :func:`attention_maps` from what the hooks kept."""
        if self.method == "full":
            return torch.stack([self.rows[i] for i in layers], dim=1)  # (B, L, H, N, N)
        if self.method == "cls":
            rows = torch.stack([self.rows[i] for i in layers], dim=1)  # (B, L, H, N)
            return rows[..., self.first_patch :].reshape(*rows.shape[:3], *grid)  # (B, L, H, gh, gw)
        joint = self.joint  # (B, N, N)
        if self.query_row is not None:
            row = joint[:, self.query_row]
        else:
            row = joint[:, self.first_patch :].mean(dim=1)
        return row[:, self.first_patch :].reshape(joint.shape[0], *grid)  # (B, gh, gw)
