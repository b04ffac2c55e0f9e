"""``vit-fast predict``: a trained model on image files -> top-k classes (table, JSONL or CSV), and optionally
one attention-map overlay per image, taken from the same fast forward (:mod:`vit_fast.attn_maps`).

The model comes from a training run's directory (``model.safetensors`` + ``summary.json``, as ``vit-fast
train`` writes them), from a checkpoint file (its config from the file's metadata, else ``--model NAME``), or
is a preset. Preprocessing (resize, center crop, mean/std) is taken, in this order, from the flags, the run's
summary, the model's ``pretrained_cfg`` (timm's keys), then defaults.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The exit status when some inputs were skipped (unreadable files, names that matched nothing) and the rest
# predicted: sysexits.h's EX_DATAERR, apart from 1 (nothing predicted, or a mistake in the arguments) and from
# vit_fast.fileio.EXIT_WRITE_FAILED (74: an output could not be written). --skip-bad makes it 0.
EXIT_SKIPPED = 65
# 16-bit (and 32-bit integer) samples, which PIL's conversion to 8 bits would clip rather than scale
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class UnreadableImageError(ValueError):
    """``path`` is no image this reader can decode; ``reason`` says why (the decoder's own error)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason)


# --------------------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocess:
    """Image file -> normalized (C, H, W) float tensor: resize the shorter side to ``img_size / crop_pct``,
    center-crop ``img_size``, scale to [0, 1], normalize by ``mean``/``std``. ``in_chans`` 1 reads images as
    grayscale, 3 as RGB (other modes are converted; a grayscale/RGB mismatch is noted)."""

    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    in_chans: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1]; got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {self.interpolation!r}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"image files give 1 or 3 channels; the model takes {self.in_chans}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.in_chans:
                raise ValueError(f"{name} needs {self.in_chans} values for this model; got {getattr(self, name)}")

    def load(self, path: str) -> tuple[torch.Tensor, str | None]:
        """``(image (C, H, W) in [0, 1] after resize and crop, note)``: the EXIF orientation applied, 16-bit
        samples scaled to 8 bits, an animation's first frame. Any file that does not decode (truncated, not an
        image, over PIL's decompression-bomb limit) raises :class:`UnreadableImageError`, and only that."""
        from torchvision.transforms.v2 import functional as TF

        try:
            image, notes = _decode(path, self.in_chans)
            x = TF.pil_to_tensor(image)  # (C, H, W) uint8
            h, w = self.img_size
            if h == w:  # timm's rule: the shorter side to img_size / crop_pct, aspect kept
                size: list[int] = [math.floor(h / self.crop_pct)]
            else:
                size = [math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)]
            x = TF.resize(x, size, interpolation=TF.InterpolationMode(self.interpolation), antialias=True)
            x = TF.center_crop(x, [h, w])
        except Exception as e:  # noqa: BLE001 - PIL's decoders raise any type on a broken file (OSError,
            # SyntaxError, struct.error, ValueError, ...): each means this file is no readable image
            raise UnreadableImageError(path, f"not a readable image ({type(e).__name__}: {e})") from e
        return TF.to_dtype(x, torch.float32, scale=True), "; ".join(notes) or None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


def _decode(path: str, in_chans: int) -> tuple[object, list[str]]:
    """The PIL image of ``path`` in the model's mode ("L" or "RGB"), upright, and notes on what was converted."""
    from PIL import Image, ImageMode, ImageOps

    notes: list[str] = []
    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        im.load()
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception as e:  # noqa: BLE001 - a garbled EXIF block: the pixels are still worth predicting
            upright = im.copy()
            notes.append(f"EXIF orientation not applied (unreadable EXIF: {type(e).__name__})")
    if frames > 1:
        notes.append(f"first of {frames} frames")
    gray = ImageMode.getmode(upright.mode).basemode == "L"  # L, LA, I, I;16, 1; a palette image is color
    if upright.mode in _WIDE_INT_MODES:
        import numpy as np

        samples = np.asarray(upright, dtype=np.float64)
        upright = Image.fromarray(np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8))
        notes.append("16-bit samples scaled to 8 bits")
    image = upright.convert("L" if in_chans == 1 else "RGB")
    if gray != (in_chans == 1):
        notes.insert(0, f"converted {'grayscale' if gray else 'color'} to {'grayscale' if in_chans == 1 else 'RGB'}")
    return image, notes


def _size_pair(v: object) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    seq = list(v)  # type: ignore[call-overload]
    return (int(seq[-2]), int(seq[-1]))  # (H, W) or timm's (C, H, W)


def preprocess_for(model: torch.nn.Module, summary: dict | None = None, *, img_size: int | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   crop_pct: float | None = None, interpolation: str | None = None) -> Preprocess:
    """The :class:`Preprocess` of ``model``: each setting from the arguments, else the training run's
    ``summary``, else ``model.pretrained_cfg``, else defaults (ImageNet's mean/std for RGB, 0.5/0.5 for one
    channel; crop_pct 0.875 from 128 px up, 1.0 below; bilinear)."""
    cfg = getattr(model, "config", None)  # a timm CNN trained here has none: its run's summary says
    model_img_size = cfg.img_size if cfg is not None else (summary or {}).get("img_size")
    in_chans = int(cfg.in_chans if cfg is not None else (summary or {}).get("in_chans", 3))
    run: dict = {}
    if summary:
        run = dict(_dataset_stats(summary.get("dataset")) or {})
        run.update({k: summary[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in summary})
        if "img_size" in summary:
            run["img_size"] = summary["img_size"]
    timm_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if "input_size" in timm_cfg:
        timm_cfg["img_size"] = timm_cfg["input_size"]

    def pick(key: str, given: object, default: object) -> object:
        if given is not None:
            return given
        for source in (run, timm_cfg):
            if source.get(key) is not None:
                return source[key]
        return default

    size = _size_pair(pick("img_size", img_size, model_img_size))
    if model_img_size is not None and size != _size_pair(model_img_size):
        raise ValueError(f"img_size {size} differs from the model's {_size_pair(model_img_size)}")
    rgb = in_chans == 3
    return Preprocess(
        img_size=size,
        mean=tuple(float(v) for v in pick("mean", mean, _IMAGENET_MEAN if rgb else (0.5,))),
        std=tuple(float(v) for v in pick("std", std, _IMAGENET_STD if rgb else (0.5,))),
        crop_pct=float(pick("crop_pct", crop_pct, 0.875 if min(size) >= 128 else 1.0)),
        interpolation=str(pick("interpolation", interpolation, "bilinear")),
        in_chans=in_chans,
    )


def _dataset_stats(dataset: object) -> dict | None:
    """mean/std/crop/filter of a dataset `vit-fast train` knows, as its evaluation transform uses them."""
    if not isinstance(dataset, str):
        return None
    if dataset == "imagefolder":  # photos of any size: ImageNet statistics, the 0.875 center crop
        return {"mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "crop_pct": 0.875, "interpolation": "bilinear"}
    from vit_fast.train.data import dataset_info

    try:
        info = dataset_info(dataset)
    except (ValueError, FileNotFoundError):
        return None
    return {"mean": info.mean, "std": info.std, "crop_pct": 1.0, "interpolation": "bilinear"}


# ------------------------------------------------------------------------------------------ the model

def load_model(spec: str, *, model_name: str | None = None) -> tuple[torch.nn.Module, dict | None, str]:
    """``(model, run summary or None, description)`` for a run directory (read by :mod:`vit_fast.rundir`), a
    checkpoint file or a preset name."""
    import vit_fast
    from vit_fast import rundir

    path = Path(spec)
    if path.is_dir():
        run = rundir.read_run(path)
        if model_name is not None and run.config()[0] is None:  # the run records no config: --model names it
            return _model_from(run.weights_path, None, model_name), run.summary, run.description
        return run.load_model(), run.summary, run.description
    if path.is_file():
        return _model_from(path, rundir.weights_config(path), model_name), None, f"checkpoint {path}"
    if spec in vit_fast.list_models():
        warnings.warn(f"preset {spec} has freshly initialized weights: pass a run directory or a checkpoint "
                      "for meaningful predictions", stacklevel=2)
        return vit_fast.create_model(spec), None, f"preset {spec} (untrained)"
    raise FileNotFoundError(f"MODEL {spec!r} is neither a run directory, a checkpoint file nor a preset name "
                            "(see vit_fast.list_models())")


def _model_from(weights: Path, config: dict | None, model_name: str | None) -> torch.nn.Module:
    import vit_fast
    from vit_fast import rundir
    from vit_fast.weights import read_state_dict

    if config is not None:
        return rundir.load_weights(rundir.build_network(config, weights), weights)
    if model_name is None:
        raise ValueError(f"{weights} records no model config: name its preset with --model NAME")
    # the head and the input channels follow the checkpoint, not the preset's ImageNet defaults
    sd = read_state_dict(weights)
    shape = {k: tuple(v.shape) for k, v in sd.items() if k in ("head.weight", "patch_embed.proj.weight")}
    overrides = {}
    if "head.weight" in shape:
        overrides["num_classes"] = shape["head.weight"][0]
    if "patch_embed.proj.weight" in shape:
        overrides["in_chans"] = shape["patch_embed.proj.weight"][1]
    model = vit_fast.create_model(model_name, **overrides)
    vit_fast.load_checkpoint(model, weights)
    return model


def read_labels(source: str | None, summary: dict | None, num_classes: int) -> list[str]:
    """Class names: from ``source`` (a text file, one name a line; a JSON list, or an object from "0", "1", ...
    to names; or an ImageFolder directory, whose class folders are taken in ImageFolder's order), else the
    run's (:func:`vit_fast.rundir.class_names`), else the class indices."""
    from vit_fast.fileio import read_json
    from vit_fast.rundir import class_names

    if source is None:
        return class_names(summary, num_classes) or [str(i) for i in range(num_classes)]
    path = Path(source)
    if path.is_dir():
        root = path / "train" if (path / "train").is_dir() else path
        names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    elif path.suffix == ".json":
        data = read_json(path, what="labels file", expect=(list, dict))
        names = [str(v) for v in data] if isinstance(data, list) else [str(data.get(str(i))) for i in range(len(data))
                                                                      if str(i) in data]
    else:
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--labels {source}: not UTF-8 text (byte {e.start})") from e
        while names and not names[-1]:
            names.pop()
    if len(names) != num_classes:
        raise ValueError(f"--labels {source} names {len(names)} classes; the model has {num_classes}")
    return names


# ----------------------------------------------------------------------------------------------- inputs

def find_images(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(files, problems)``: each spec is a file (taken whatever its extension, so a broken one is reported),
    a folder (its image files, recursively) or a glob pattern; sorted within each spec, duplicates dropped.
    Only regular files are taken: a pipe or a device named like an image would block the reader."""
    files: list[str] = []
    problems: list[str] = []
    for spec in specs:
        if os.path.isfile(spec):
            found = [spec]
        elif os.path.isdir(spec):
            found = sorted(p for p in (os.path.join(d, f) for d, _, names in os.walk(spec) for f in names
                                       if f.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isfile(p))
        elif os.path.exists(spec):
            found = []
        else:
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            problems.append(f"{spec}: not a regular file" if os.path.exists(spec) and not os.path.isdir(spec)
                            else f"{spec}: no such file, or no image files there")
        files.extend(found)
    return list(dict.fromkeys(files)), problems


class ImageFiles(torch.utils.data.Dataset):
    """``files[i]`` -> a dict of the index, the preprocessed image (None if it cannot be read), the error."""

    def __init__(self, files: Sequence[str], preprocess: Preprocess) -> None:
        self.files, self.preprocess = list(files), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            image, note = self.preprocess.load(self.files[i])
        except UnreadableImageError as e:  # reported with the file; the batch goes on
            return {"index": i, "image": None, "note": None, "error": e.reason}
        return {"index": i, "image": image, "note": note, "error": None}


def _collate(items: list[dict]) -> list[dict]:
    return items


# ---------------------------------------------------------------------------------------------- running

def run(args: argparse.Namespace) -> int:
    """``vit-fast predict``; returns the exit status: 0, or 1 when nothing could be predicted (or for a mistake in
    the arguments), or :data:`EXIT_SKIPPED` when some input was skipped and ``--skip-bad`` was not given."""
    import vit_fast

    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        raise ValueError("--top-k and --batch-size must be >= 1, --workers >= 0")
    out_format = _out_format(args.out)
    model, summary, description = load_model(args.model_spec, model_name=args.model)
    preprocess = preprocess_for(model, summary, img_size=args.img_size, mean=args.mean, std=args.std,
                                crop_pct=args.crop_pct, interpolation=args.interpolation)
    if model.num_classes < 1:
        raise ValueError(f"{description} has no classifier head (num_classes=0): it gives features, not classes")
    if args.attention_maps:  # before any image is read: the maps come from a ViT's attention blocks
        from vit_fast.attn_maps import blocks_of

        try:
            blocks_of(getattr(model, "_orig_mod", model))
        except ValueError:
            raise ValueError(f"--attention-maps needs a ViT; {description} is a {type(model).__name__}, which has "
                             "no attention to map") from None
    labels = read_labels(args.labels, summary, model.num_classes)
    files, problems = find_images(args.images)
    for p in problems:
        print(f"vit-fast predict: {p}", file=sys.stderr)
    if not files:
        raise FileNotFoundError("no image files found in " + " ".join(args.images))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    k = min(args.top_k, model.num_classes)
    maps_dir = Path(args.attention_maps) if args.attention_maps else None
    loader = torch.utils.data.DataLoader(ImageFiles(files, preprocess), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=_collate)
    records: list[dict] = [{} for _ in files]
    used_names: set[str] = set()
    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="img", desc=f"predict {description}", disable=not args.progress,
               file=sys.stderr, dynamic_ncols=True)
    with vit_fast.set_backend(args.backend), bar:
        for items in loader:
            for it in items:
                records[it["index"]] = {"path": files[it["index"]],
                                        **{key: it[key] for key in ("error", "note") if it[key]}}
            good = [it for it in items if it["image"] is not None]
            if good:
                display = torch.stack([it["image"] for it in good])  # (B, C, H, W) in [0, 1]
                top, maps = _classify(model, preprocess.normalize(display).to(device), k, maps_dir is not None, args)
                for row, it in enumerate(good):
                    rec = records[it["index"]]
                    rec["top"] = [{"class": c, "label": labels[c], "prob": p} for c, p in top[row]]
                    if maps is not None:
                        png = maps_dir / _unique_png_name(files[it["index"]], used_names)
                        write_overlay(png, display[row], maps[row], rec["top"][0],
                                      title=os.path.basename(files[it["index"]]))
                        rec["attention_map"] = os.fspath(png)
            bar.update(len(items))

    print(format_table(records, k))
    if args.out:
        write_records(records, args.out, out_format, k)
    return _status(records, problems, args.skip_bad)


def _status(records: Sequence[dict], problems: Sequence[str], skip_bad: bool) -> int:
    """Says on stderr what was skipped or converted; the exit status: 1 when no image could be predicted,
    :data:`EXIT_SKIPPED` when some input was skipped (unless ``skip_bad``), else 0."""
    failed = sum("error" in r for r in records)
    converted = sum("note" in r for r in records)
    status = 1 if failed == len(records) else EXIT_SKIPPED if (failed or problems) and not skip_bad else 0
    if failed or converted or problems:
        unmatched = f", {len(problems)} input(s) matched no image file" if problems else ""
        why = f" (exit status {EXIT_SKIPPED}; --skip-bad makes it 0)" if status == EXIT_SKIPPED else ""
        print(f"{len(records) - failed} of {len(records)} images predicted; {failed} skipped (not readable){unmatched}"
              f"{why}; {converted} converted (see each file's note)", file=sys.stderr)
    return status


def _classify(model: torch.nn.Module, x: torch.Tensor, k: int, with_maps: bool,
              args: argparse.Namespace) -> tuple[list[list[tuple[int, float]]], torch.Tensor | None]:
    """Each image's top-k ``(class, probability)`` pairs, and its (gh, gw) attention map (CPU) when asked for,
    from one forward."""
    from vit_fast.attn_maps import forward_with_attention_maps, fuse_heads

    maps = None
    if with_maps:
        layers = args.layer if args.map_method == "cls" else None
        logits, maps = forward_with_attention_maps(model, x, method=args.map_method, layers=layers,
                                                   head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
        if args.map_method == "cls":  # (B, 1, H, gh, gw): one layer, heads fused as for rollout
            maps = fuse_heads(maps[:, 0], args.head_fusion)
        maps = maps.cpu()
    else:
        with torch.inference_mode():
            logits = model(x)
    top_p, top_i = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return [list(zip(c, p, strict=True)) for c, p in zip(top_i.tolist(), top_p.tolist(), strict=True)], maps


def _out_format(out: str | None) -> str | None:
    if out is None:
        return None
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".jsonl", ".csv"):
        raise ValueError(f"--out must end in .jsonl or .csv; got {out!r}")
    return ext[1:]


def _unique_png_name(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}.png"
    used.add(name)
    return name


def format_table(records: Sequence[dict], k: int) -> str:
    """A plain-text table: one row per image, its top-k labels with their probabilities (or why it failed)."""
    width = min(60, max([len("image")] + [len(r["path"]) for r in records]))
    lines = [f"{'image':<{width}}  " + "  ".join(f"{f'top-{i + 1}':<22}" for i in range(k)).rstrip()]
    for r in records:
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        if "top" in r:
            cells = [f"{t['label'][:14]} {t['prob']:>6.1%}" for t in r["top"]]
            lines.append(f"{path:<{width}}  " + "  ".join(f"{c:<22}" for c in cells).rstrip())
        else:
            lines.append(f"{path:<{width}}  skipped: {r['error']}")
    return "\n".join(lines)


def write_records(records: Sequence[dict], path: str, out_format: str | None, k: int) -> None:
    """JSONL (one object per image) or CSV (one row per image: path, error, note, then label/class/prob per
    rank), written atomically."""
    from vit_fast.fileio import atomic_write

    if out_format == "jsonl":
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
        return
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "error", "note"] + [f"{c}_{i + 1}" for i in range(k) for c in ("label", "class", "prob")])
    for r in records:
        ranks = [v for t in r.get("top", []) for v in (t["label"], t["class"], f"{t['prob']:.6f}")]
        w.writerow([r["path"], r.get("error", ""), r.get("note", "")] + ranks)
    atomic_write(path, buf.getvalue())


def write_overlay(path: Path, image: torch.Tensor, heat: torch.Tensor, top: dict, *, title: str) -> None:
    """A PNG of ``image`` (C, H, W) in [0, 1] beside the same image under its (gh, gw) ``heat`` map, upsampled
    bilinearly over the image and scaled to [0, 1] for display."""
    import torch.nn.functional as F
    from matplotlib.figure import Figure

    from vit_fast.fileio import atomic_write

    h, w = image.shape[-2:]
    fine = max(1, math.ceil(128 / min(h, w)))  # a smooth map even over an 8x8 image shown in big pixels
    up = F.interpolate(heat[None, None].float(), size=(h * fine, w * fine), mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
    gray = image.shape[0] == 1
    shown = image[0] if gray else image.permute(1, 2, 0)
    fig = Figure(figsize=(6, 3.3), layout="constrained")
    ax_img, ax_map = fig.subplots(1, 2)
    for ax in (ax_img, ax_map):
        ax.imshow(shown.numpy(), cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
    ax_map.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    ax_img.set_title(title, fontsize=9)
    ax_map.set_title(f"{top['label']} ({top['prob']:.0%})", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vit_fast.attn_maps import HEAD_FUSIONS
    from vit_fast.backends import CHOICES
    from vit_fast.fileio import EXIT_WRITE_FAILED

    parser.add_argument("model_spec", metavar="MODEL",
                        help="a `vit-fast train` run directory, a checkpoint file (.safetensors/.pt/.pth; give "
                        "--model NAME when it records no config) or a preset name (untrained)")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files, folders (searched recursively) "
                        "or glob patterns; PNG, JPEG and what else PIL reads")
    parser.add_argument("--model", default=None, metavar="NAME", help="preset of a checkpoint without a config")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--labels", default=None, metavar="FILE|DIR",
                        help="class names: a text file (one a line), a JSON list, or an ImageFolder tree (its class "
                        "folders) (default: the run's dataset's names, else class indices)")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl|FILE.csv", help="also write the predictions")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)),
                        help="DataLoader processes decoding images (default: min(4, cores - 1))")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if visible)")
    parser.add_argument("--backend", default="auto", choices=CHOICES, help="kernel backend (default: auto)")
    pre = parser.add_argument_group("preprocessing (default: the run's, else the model's pretrained_cfg)")
    pre.add_argument("--img-size", type=int, default=None, help="input resolution (must be the model's)")
    pre.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean of [0, 1] pixels")
    pre.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std of [0, 1] pixels")
    pre.add_argument("--crop-pct", type=float, default=None,
                     help="resize the shorter side to img_size / crop_pct, then center-crop img_size")
    pre.add_argument("--interpolation", default=None, choices=INTERPOLATIONS, help="resize filter")
    maps = parser.add_argument_group("attention maps")
    maps.add_argument("--attention-maps", default=None, metavar="DIR",
                      help="write DIR/<image name>.png per image: the image and its attention heatmap")
    maps.add_argument("--map-method", default="rollout", choices=("rollout", "cls"),
                      help="rollout through all layers (default), or the class token's attention in --layer")
    maps.add_argument("--layer", type=int, default=-1, help="block for --map-method cls (default: -1, the last)")
    maps.add_argument("--head-fusion", default="mean", choices=HEAD_FUSIONS, help="how heads combine (default: mean)")
    maps.add_argument("--discard-ratio", type=float, default=0.0,
                      help="rollout: fraction of the lowest attention weights dropped per layer (default: 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="exit with status 0 when some inputs are skipped (unreadable files, names that match "
                        f"no file); they are still reported (default: exit status {EXIT_SKIPPED})")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.epilog = (f"exit status: 0 when every image was predicted; {EXIT_SKIPPED} when some input was skipped "
                     f"(0 with --skip-bad); 1 when none could be predicted or for a mistake in the arguments; "
                     f"{EXIT_WRITE_FAILED} when an output could not be written (a full disk)")
    return parser
