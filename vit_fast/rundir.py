"""The one reader of a ``vit-fast train`` run directory: its summary, model config, weights, newest checkpoint,
metrics, class names and test split, for ``vit-fast predict``, ``report`` and ``eval``.

A run directory (``--out``) holds, as :mod:`vit_fast.train` writes them, ``summary.json`` (once the run has
finished), ``model.safetensors`` (the final weights, the model config in their metadata), ``metrics.jsonl`` and
``checkpoints/step_NNNNNNNN.pt``. :func:`read_run` opens one. A file of it that is torn, bit-flipped or of the
wrong shape raises :class:`RunDirError`, a ``ValueError`` whose message names the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vit_fast.fileio import FileFormatError, read_json

SUMMARY, WEIGHTS, METRICS, CHECKPOINTS = "summary.json", "model.safetensors", "metrics.jsonl", "checkpoints"

# Label names of the datasets `vit-fast train` knows without files; other runs record theirs in summary.json.
KNOWN_LABELS: dict[str, list[str]] = {
    "digits": [str(i) for i in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    # the fine labels in the order of the data set's meta file (alphabetical), which training's labels follow
    "cifar100": """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
        camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
        dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard
        lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
        pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
        shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
        television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split(),
}


class RunDirError(FileFormatError):
    """A file of a run directory that cannot be used: the message names the file and what is wrong with it."""


# ---- types of what the files hold -----------------------------------------------------------------------------

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_size(v: object) -> bool:
    """An image or patch size: a positive int or [H, W] (timm's (C, H, W) too, for an input size)."""
    if _is_int(v):
        return v > 0
    return isinstance(v, list) and len(v) in (2, 3) and all(_is_int(x) and x > 0 for x in v)


_KINDS = {
    "a string": lambda v: isinstance(v, str),
    "an integer": _is_int,
    "a number": _is_number,
    "an object": lambda v: isinstance(v, dict),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of numbers": lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
    "a size (a positive integer or [H, W])": _is_size,
}
_STR, _INT, _NUM, _OBJ, _STRS, _NUMS, _SIZE = _KINDS
# What summary.json's keys hold (None is allowed for each: e.g. no test accuracy before the first evaluation).
SUMMARY_KEYS: dict[str, str] = {
    **dict.fromkeys(("dataset", "model", "precision", "device", "model_family", "interpolation", "vit_fast",
                     "torch"), _STR),
    **dict.fromkeys(("world_size", "epochs", "steps", "batch_size", "skipped_steps", "in_chans", "num_classes",
                     "params"), _INT),
    **dict.fromkeys(("test_top1", "test_top5", "test_loss", "train_images_per_s", "train_s", "wall_s", "gflops",
                     "inference_images_per_s", "crop_pct"), _NUM),
    "config": _OBJ, "recipe": _OBJ, "classes": _STRS, "class_names": _STRS, "mean": _NUMS, "std": _NUMS,
    "img_size": _SIZE,
}
# What report and the curves read from metrics.jsonl: per record kind, the keys each record must have.
METRICS_KEYS: dict[str, dict[str, str]] = {
    "train": {"step": _INT, "epoch": _INT, "loss": _NUM},
    "eval": {"epoch": _INT, "test_top1": _NUM},
}
_METRICS_OPTIONAL = {"acc": _NUM, "lr": _NUM, "img_s": _NUM, "test_top5": _NUM, "test_loss": _NUM}


def type_problems(doc: dict, kinds: dict[str, str], *, required: Sequence[str] = ()) -> list[str]:
    """What in ``doc`` is not of the kind :data:`SUMMARY_KEYS`-style ``kinds`` give (keys not in ``kinds`` are
    not looked at; a key in ``required`` must be present and not None)."""
    found = [f"{key!r} is missing" for key in required if doc.get(key) is None]
    for key, kind in kinds.items():
        value = doc.get(key)
        if value is not None and not _KINDS[kind](value):
            found.append(f"{key!r} is {_shown(value)}, not {kind}")
    return found


def _pair(size: object) -> tuple:
    """``8`` and ``[8, 8]`` (and timm's ``[C, 8, 8]``) alike; anything else as it is, to compare."""
    if _is_int(size):
        return (size, size)
    return tuple(size[-2:]) if isinstance(size, list) else (size,)


def _shown(value: object) -> str:
    """``a str ("8")``, ``an int (1)``, ``a list``: a value's type, and the value where it is short."""
    name = type(value).__name__
    article = "an" if name[0] in "aeiou" else "a"
    if isinstance(value, (str, int, float, bool)):
        return f"{article} {name} ({json.dumps(value)[:40]})"
    return f"{article} {name}"


# The fields that make a ViT's shape, in every config `vit-fast train` ever wrote: one missing means a damaged
# file (fields added later may be absent from older runs and take their defaults).
_VIT_REQUIRED = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads")


def config_problems(config: object) -> list[str]:
    """What makes ``config`` not the model config ``vit-fast train`` records: a vit_fast ``ViTConfig``'s fields
    with values of their types, or a timm CNN's ``{"family": "timm", "name", "kwargs", "small_input_stem"}``."""
    if not isinstance(config, dict):
        return [f"the model config is {_shown(config)}, not an object"]
    if config.get("family") == "timm":
        found = type_problems(config, {"name": _STR, "kwargs": _OBJ}, required=("name", "kwargs"))
        stem = config.get("small_input_stem")
        if stem is not None and not (isinstance(stem, dict) and isinstance(stem.get("conv"), str)
                                     and isinstance(stem.get("pool"), (str, type(None)))):
            found.append("'small_input_stem' is neither null nor {\"conv\": name, \"pool\": name or null}")
        return found
    from vit_fast.config import ViTConfig

    fields = {f.name: f.default for f in dataclasses.fields(ViTConfig) if f.init}
    found = [f"unknown ViTConfig field {k!r}" for k in sorted(set(config) - set(fields))]
    found += [f"ViTConfig field {k!r} is missing" for k in _VIT_REQUIRED if k not in config]
    for name, value in config.items():
        if name not in fields:
            continue
        default = fields[name]
        if name in ("img_size", "patch_size"):
            ok = _is_size(value) and (_is_int(value) or len(value) == 2)
        elif name == "fc_norm":
            ok = value is None or isinstance(value, bool)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = _is_int(value) and value >= 0
        elif isinstance(default, float):
            ok = _is_number(value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            found.append(f"ViTConfig field {name!r} is {_shown(value)}")
    return found


# ---- the network ------------------------------------------------------------------------------------------------

def build_network(config: dict, source: str | os.PathLike) -> torch.nn.Module:
    """The network of a model ``config`` (a vit_fast ViT's or a timm CNN's, as :func:`config_problems` checks),
    with fresh weights; a config that is not one raises :class:`RunDirError` naming ``source``, the file it
    came from."""
    problems = config_problems(config)
    if problems:
        raise RunDirError(f"{source}: not a model config of `vit-fast train`: {'; '.join(problems)}")
    try:
        if config.get("family") == "timm":
            from vit_fast.train.models import model_from_config

            return model_from_config(config)
        import vit_fast

        return vit_fast.VisionTransformer(vit_fast.ViTConfig(**config))
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:  # RuntimeError: sizes too big
        raise RunDirError(f"{source}: its model config does not make a network: {_message(e)}") from e


def load_weights(model: torch.nn.Module, weights: str | os.PathLike) -> torch.nn.Module:
    """``weights`` (a state dict file) loaded into ``model`` from :func:`build_network`: a vit_fast ViT through
    ``vit_fast.load_checkpoint`` (timm / Hugging Face names too), a timm CNN by its own names; weights that do not
    fit raise :class:`RunDirError` naming the file."""
    import vit_fast
    from vit_fast.weights import read_state_dict

    try:
        if isinstance(model, vit_fast.VisionTransformer):
            vit_fast.load_checkpoint(model, weights)
        else:
            model.load_state_dict(read_state_dict(weights))
    except (KeyError, ValueError, RuntimeError) as e:
        raise RunDirError(f"{os.fspath(weights)}: cannot be loaded into the model its config describes: "
                          f"{_message(e)}") from e
    return model


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def weights_config(path: str | os.PathLike) -> dict | None:
    """The model config ``vit-fast train`` stores in a ``.safetensors``' metadata or in a training checkpoint,
    or None when the file records none; a recorded config that is not JSON raises :class:`RunDirError`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                text = (f.metadata() or {}).get("config")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a broken header
            raise RunDirError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        if not text:
            return None
        try:
            config = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise RunDirError(f"{path}: the model config in its metadata is not JSON ({e})") from e
        if not isinstance(config, dict):
            raise RunDirError(f"{path}: the model config in its metadata is {_shown(config)}, not an object")
        return config
    if path.suffix in (".pt", ".pth"):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not a training checkpoint: load_checkpoint reports unreadable files
            return None
        return ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else None
    return None


def class_names(summary: dict | None, num_classes: int) -> list[str] | None:
    """The run's class names in label order (recorded in its summary, or known for its dataset), or None when
    none are known for ``num_classes`` classes."""
    if not summary:
        return None
    names = summary.get("classes") or summary.get("class_names") or KNOWN_LABELS.get(summary.get("dataset"))
    return [str(n) for n in names] if names is not None and len(names) == num_classes else None


# ---- the run directory ------------------------------------------------------------------------------------------

def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding any file of a run (a finished one or one in progress)."""
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in (SUMMARY, WEIGHTS, METRICS, CHECKPOINTS))


@dataclass
class Run:
    """A run directory, read: ``summary`` is its ``summary.json`` (None while the run is in progress)."""

    path: Path
    summary: dict | None
    _checkpoint: list = field(default_factory=list, repr=False)  # the newest checkpoint, once read

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def description(self) -> str:
        return f"run {self.path}"

    def newest_checkpoint(self) -> dict | None:
        """The newest readable training checkpoint (an unreadable one is passed over with a warning), or None."""
        if not self._checkpoint:
            from vit_fast.train.checkpoints import load_newest_checkpoint

            self._checkpoint.append(load_newest_checkpoint(self.path / CHECKPOINTS))
        return self._checkpoint[0]

    def facts(self) -> dict:
        """The summary; for a run in progress what its newest checkpoint tells, under the summary's keys
        (config, wall_s, model, dataset, epochs)."""
        if self.summary is not None:
            return self.summary
        ckpt = self.newest_checkpoint() or {}
        recipe = ckpt.get("recipe") if isinstance(ckpt.get("recipe"), dict) else {}
        found = {"config": ckpt.get("config"), "wall_s": ckpt.get("wall_s"),
                 **{k: recipe.get(k) for k in ("model", "dataset", "epochs")}}
        problems = type_problems(found, SUMMARY_KEYS)
        if problems:
            raise RunDirError(f"{ckpt['path']}: not a checkpoint of `vit-fast train`: {'; '.join(problems)}")
        return {k: v for k, v in found.items() if v is not None}

    def config(self) -> tuple[dict | None, str]:
        """``(model config, the file it was read from)``: the summary's, else the final weights' metadata, else
        the newest checkpoint's; ``(None, "")`` when no file records one."""
        if self.summary is not None and self.summary.get("config") is not None:
            return self.summary["config"], os.fspath(self.path / SUMMARY)
        if self.weights_path.is_file():
            config = weights_config(self.weights_path)
            if config is not None:
                return config, os.fspath(self.weights_path)
        ckpt = self.newest_checkpoint() if self.summary is None else None
        if ckpt and ckpt.get("config") is not None:
            return ckpt["config"], ckpt["path"]
        return None, ""

    def network(self) -> torch.nn.Module | None:
        """The run's architecture with fresh weights (for its size and speed), or None when no file records its
        config."""
        config, source = self.config()
        return None if config is None else build_network(config, source)

    def load_model(self) -> torch.nn.Module:
        """The trained model: the run's network with its final weights (``model.safetensors``)."""
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"{self.path} holds no {WEIGHTS}: not a finished `vit-fast train` run")
        config, source = self.config()
        if config is None:
            raise RunDirError(f"{self.weights_path}: records no model config, and the run has no {SUMMARY} "
                              "that does")
        return load_weights(build_network(config, source), self.weights_path)

    def class_names(self, num_classes: int) -> list[str] | None:
        """See :func:`class_names`."""
        return class_names(self.summary, num_classes)

    def metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (a torn last line, left by a killed run, is skipped); a record of a
        known kind without the keys the curves read raises :class:`RunDirError` naming the file."""
        from vit_fast.train.metrics import read_metrics

        path = self.path / METRICS
        try:
            records = read_metrics(path)
        except UnicodeDecodeError as e:
            raise RunDirError(f"{path}: not UTF-8 text (byte {e.start})") from e
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                problems = [f"holds {_shown(r)}, not an object"]
            else:
                need = METRICS_KEYS.get(r["kind"], {}) if isinstance(r.get("kind"), str) else {}
                problems = type_problems(r, {"kind": _STR, **_METRICS_OPTIONAL, **need}, required=tuple(need))
            if problems:
                raise RunDirError(f"{path}: record {i + 1}: {'; '.join(problems)}")
        return records

    def test_split(self, data_dir: str | os.PathLike | None = None) -> torch.utils.data.Dataset:
        """The test split the run was trained against, preprocessed as training's evaluation preprocesses it
        (``data_dir``: the dataset's folder, for CIFAR and ImageFolder runs)."""
        from vit_fast.train import data

        facts = self.facts()
        name = facts.get("dataset") or (facts.get("recipe") or {}).get("dataset")
        img_size = facts.get("img_size")
        if name is None or img_size is None:
            raise RunDirError(f"{self.path / SUMMARY}: names no {'dataset' if name is None else 'img_size'}, so "
                              "the run's test split is not known")
        size = img_size if isinstance(img_size, int) else img_size[-1]
        _train, test, _info = data.load_datasets(name, data_dir, int(size), data.Augmentation())
        return test


def read_run(path: str | os.PathLike) -> Run:
    """The run directory ``path``, with its ``summary.json`` read and checked. A directory holding no file of a
    run raises ``FileNotFoundError``; a summary that is torn, not JSON or has keys of the wrong type raises
    :class:`RunDirError` naming it."""
    p = Path(path)
    if not is_run_dir(p):
        what = "does not exist" if not p.exists() else "is not a directory" if not p.is_dir() else \
            f"holds none of {SUMMARY}, {WEIGHTS}, {METRICS}, {CHECKPOINTS}/"
        raise FileNotFoundError(f"{p} {what}: not a `vit-fast train` run directory")
    summary = None
    if (p / SUMMARY).exists():
        try:
            summary = read_json(p / SUMMARY, what="run summary")
        except FileFormatError as e:
            raise RunDirError(str(e)) from e
        problems = type_problems(summary, SUMMARY_KEYS)
        config = summary.get("config")
        if not problems and isinstance(config, dict) and config.get("family") != "timm" and \
                summary.get("img_size") is not None and config.get("img_size") is not None and \
                _pair(summary["img_size"]) != _pair(config["img_size"]):
            problems.append(f"'img_size' {summary['img_size']} is not its model config's {config['img_size']}")
        if problems:
            raise RunDirError(f"{p / SUMMARY}: not a valid run summary: {'; '.join(problems)}")
    return Run(p, summary)


__all__ = ["KNOWN_LABELS", "Run", "RunDirError", "build_network", "class_names", "config_problems", "is_run_dir",
           "load_weights", "read_run", "type_problems", "weights_config"]
