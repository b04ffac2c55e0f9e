"""Position embeddings at other image sizes: bicubic resampling of the learned table (timm's
``resample_abs_pos_embed``, numerically), and a cache of the resampled tables for dynamic image sizes.

A model built with ``dynamic_img_size=True`` resamples its (1, prefix + H*W, E) ``pos_embed`` to the patch grid
of every batch. The interpolation is cheap next to the model but not free (a float32 bicubic pass over the
table and a copy), and at inference the same few sizes come back batch after batch, so the resampled tables are
kept per (grid, dtype, device, inference mode) for each parameter. A table is only valid for the values it was
computed from, so an entry is stamped with the parameter's identity, its ``_version`` counter (bumped by every
in-place write through the parameter: optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``), its
``data_ptr()``, dtype and device (``.to()`` swaps the parameter's data), and it is dropped when the stamp
changes. The entry also holds the parameter's storage alive, so a freed block the allocator hands back at the
same address cannot pass for the old data. Writes through ``param.data`` bypass the version counter: after
those, call :func:`clear_pos_embed_cache`.

Nothing is cached where it would be wrong or unsafe: while gradients must flow to the parameter (grad enabled
and ``requires_grad``), while ``torch.compile`` / ``torch.export`` trace (the table is part of the graph), and for
tensor subclasses whose storage cannot be addressed.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F

__all__ = ["cached_grids", "cached_resample_pos_embed", "clear_pos_embed_cache", "grid_for", "resample_pos_embed"]

MAX_GRIDS = 16  # tables kept per parameter (least recently used dropped): arbitrary sizes must not grow memory


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample a learned (1, prefix + H*W, E) position embedding to another patch grid.

    Bicubic interpolation (antialiased when shrinking, ``align_corners=False``) over the grid in float32, cast
    back to the table's dtype; the prefix rows (class and register tokens; 0 for ``no_embed_class`` tables) are
    kept apart and unchanged. ``old_grid`` defaults to the square grid the length implies. When the grid does
    not change the table itself is returned (as timm does), so gradients and identity are kept.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, e = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch positions, not a square grid: pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not match the {n} patch positions of pos_embed")
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    dtype = pos_embed.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], e).permute(0, 3, 1, 2)  # (1, E, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], e).to(dtype)  # (1, H*W, E)
    return torch.cat([prefix, grid], dim=1)


def grid_for(img_size: tuple[int, int], patch_size: tuple[int, int], pad: bool) -> tuple[int, int]:
    """The patch grid of an ``img_size`` image: rounded up when the image is padded to the patch size, else the
    size must divide (a ValueError names both)."""
    h, w = int(img_size[0]), int(img_size[1])
    ph, pw = patch_size
    if pad:
        return -(-h // ph), -(-w // pw)
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}; resize or crop the "
                         "images, or create the model with dynamic_img_pad=True to pad them")
    return h // ph, w // pw


class _Entry:
    """The resampled tables of one parameter, valid while ``stamp`` matches it."""

    __slots__ = ("ref", "stamp", "storage", "tables")

    def __init__(self, ref: weakref.ref, stamp: tuple, storage: torch.Tensor) -> None:
        self.ref, self.stamp, self.storage = ref, stamp, storage
        self.tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()


# id(parameter) -> its entry. Keyed by id, not by the tensor (a tensor's == is elementwise, which dict probing
# through weak references would call); the weak reference's callback removes the entry when the parameter dies,
# before its id can be reused.
_CACHE: dict[int, _Entry] = {}


def _stamp(t: torch.Tensor, old_grid: tuple[int, int], num_prefix_tokens: int) -> tuple:
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(old_grid), num_prefix_tokens)


def _cacheable(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # a traced graph must compute the table from the parameter it is given
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
        return False  # subclasses (fake, functional, distributed tensors) have no stable storage to stamp
    return not (torch.is_grad_enabled() and t.requires_grad)  # training: the table must carry gradients


def cached_resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """:func:`resample_pos_embed`, with the result kept for the next call at the same grid (see the module
    docstring for when it is kept and when dropped). The same grid as ``old_grid`` returns ``pos_embed``."""
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if new_grid == tuple(old_grid):
        return pos_embed
    if not _cacheable(pos_embed):
        return resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens)
    key = id(pos_embed)
    stamp = _stamp(pos_embed, old_grid, num_prefix_tokens)
    entry = _CACHE.get(key)
    if entry is None or entry.ref() is not pos_embed or entry.stamp != stamp:
        ref = weakref.ref(pos_embed, lambda _, key=key: _drop(key))
        entry = _CACHE[key] = _Entry(ref, stamp, pos_embed.detach())
    # A table made under inference_mode is an inference tensor that autograd may not save outside it: kept apart.
    which = (new_grid, torch.is_inference_mode_enabled())
    table = entry.tables.get(which)
    if table is None:
        with torch.no_grad():
            table = resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens)
        entry.tables[which] = table
        while len(entry.tables) > MAX_GRIDS:
            entry.tables.popitem(last=False)
    else:
        entry.tables.move_to_end(which)
    return table


def _drop(key: int) -> None:
    _CACHE.pop(key, None)


def clear_pos_embed_cache(pos_embed: torch.Tensor | None = None) -> None:
    """Forget the resampled tables of ``pos_embed`` (all parameters' when None)."""
    if pos_embed is None:
        _CACHE.clear()
    else:
        entry = _CACHE.get(id(pos_embed))
        if entry is not None and entry.ref() is pos_embed:
            _drop(id(pos_embed))


def cached_grids(pos_embed: torch.Tensor) -> list[tuple[int, int]]:
    """The grids whose tables are cached for ``pos_embed`` now, stale stamps included (for tests and debugging)."""
    entry = _CACHE.get(id(pos_embed))
    if entry is None or entry.ref() is not pos_embed:
        return []
    return [grid for grid, _ in entry.tables]
