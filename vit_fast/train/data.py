"""Datasets and augmentation for training: scikit-learn's 8x8 digits, CIFAR-10/100, and ImageFolder trees.

Augmentation is made reproducible by position, not by a running random state: the training sampler hands the
dataset ``(index, seed)`` pairs, the seed derived from (run seed, epoch, index), and each image is augmented
under that seed. The images of a batch are therefore a pure function of the run seed and the batch's place in
the run, whatever the number of loader workers or processes, and a resumed run needs only its step count to
replay the same batches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, DistributedSampler, Sampler, TensorDataset
from torchvision.transforms import v2

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder")
CROPS: tuple[str, ...] = ("pad", "resized", "affine", "none")

# Independent random streams drawn from one run seed (first key after the seed).
STREAM_SAMPLE, STREAM_MIX, STREAM_MODEL = 0, 1, 2

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the split is fixed, whatever --seed is, so every run is scored on the same images


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from non-negative integer keys, well mixed (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the default CPU generator (which torchvision's transforms draw from) seeded with
    ``seed``, then put its state back. Costs ~2 us, where ``torch.random.fork_rng`` + ``torch.manual_seed``
    take ~300 us, as much as augmenting a small image."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the transforms need to know of a dataset."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int | None  # native resolution; None when the images vary (ImageFolder)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None  # the class names in label order, where the files give them


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_STATS = {  # per-channel mean and std of the training images, scaled to [0, 1]
    "digits": ((0.3053,), (0.3760,)),  # pixel values 0..16, divided by 16
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": (_IMAGENET_MEAN, _IMAGENET_STD),
}


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; every field off (0 / "none") gives the evaluation pipeline's images.

    ``crop``: ``pad`` (random crop after zero padding by ``crop_padding`` pixels), ``resized`` (random resized
    crop, area fraction from ``crop_scale`` to 1), ``affine`` (small random rotation, shift and scale, for
    digits and other images where a flip or a big crop changes the class), or ``none``.
    """

    crop: str = "none"
    crop_padding: int = 0
    crop_scale: float = 0.08
    affine_degrees: float = 10.0
    affine_translate: float = 0.1
    affine_scale: float = 0.1
    hflip: float = 0.0
    color_jitter: float = 0.0
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}; got {self.crop!r}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1]; got {self.crop_scale}")
        for name in ("hflip", "random_erasing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1]; got {getattr(self, name)}")
        if self.crop_padding < 0 or self.color_jitter < 0 or self.randaugment_ops < 0:
            raise ValueError("crop_padding, color_jitter and randaugment_ops must be >= 0")


def train_transform(info: DatasetInfo, img_size: int, aug: Augmentation) -> v2.Transform:
    """PIL image or (C, H, W) tensor in [0, 1] -> normalized float (C, img_size, img_size), augmented."""
    steps: list[v2.Transform] = [v2.ToImage()]
    if aug.crop == "resized":
        steps.append(v2.RandomResizedCrop(img_size, scale=(aug.crop_scale, 1.0), antialias=True))
    else:
        steps.append(_resize_to(info, img_size))
        if aug.crop == "pad":
            steps.append(v2.RandomCrop(img_size, padding=aug.crop_padding))
        elif aug.crop == "affine":
            steps.append(v2.RandomAffine(degrees=aug.affine_degrees,
                                         translate=(aug.affine_translate, aug.affine_translate),
                                         scale=(1.0 - aug.affine_scale, 1.0 + aug.affine_scale)))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.color_jitter:
        s = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s if info.in_chans == 3 else 0.0))
    if aug.randaugment_ops:
        steps.append(v2.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
    if aug.random_erasing:
        steps.append(v2.RandomErasing(aug.random_erasing, value=0))
    return v2.Compose(steps)


def eval_transform(info: DatasetInfo, img_size: int) -> v2.Transform:
    """The evaluation pipeline: resize (ImageFolder: resize to img_size / 0.875 and center-crop), normalize."""
    return v2.Compose([v2.ToImage(), _resize_to(info, img_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(info.mean, info.std)])


def _resize_to(info: DatasetInfo, img_size: int) -> v2.Transform:
    if info.img_size is None:  # photos of any size: the classic 0.875 center crop
        return v2.Compose([v2.Resize(round(img_size / 0.875), antialias=True), v2.CenterCrop(img_size)])
    if info.img_size == img_size:
        return v2.Identity()
    return v2.Resize((img_size, img_size), antialias=True)


class TransformedDataset(Dataset):
    """``base[i]`` -> ``(transform(image), label)``.

    A key may be an index or an ``(index, seed)`` pair; with a seed the transform draws its random numbers
    from a torch generator seeded with it (the caller's random state is left as it was).
    """

    def __init__(self, base: Dataset, transform: v2.Transform) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, seed = key
            image, label = self.base[index]
            with seeded(seed):
                return self.transform(image), int(label)
        image, label = self.base[key]
        return self.transform(image), int(label)


class TrainSampler(Sampler[tuple[int, int]]):
    """One process's share of each epoch's shuffled training set, as ``(index, augmentation seed)`` pairs.

    The order is :class:`~torch.utils.data.DistributedSampler`'s (seeded with the run seed and the epoch);
    only whole global batches are kept, so ``world_size`` processes with ``batch_size / world_size`` images
    each see, step by step, exactly the images one process sees with ``batch_size``. ``set_epoch(epoch,
    start_batch)`` starts an epoch part way through, as a resumed run needs.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        self.local_batch = batch_size // world_size
        self.seed = seed
        self.order = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.batches_per_epoch = self.order.num_samples // self.local_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({len(dataset)} images)")
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}]; got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.order)[self.start_batch * self.local_batch : self.batches_per_epoch * self.local_batch]
        for i in indices:
            yield i, derive_seed(self.seed, STREAM_SAMPLE, self.epoch, i)


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Every ``world_size``-th item from ``rank``: disjoint shards that cover the set exactly (evaluation)."""
    if world_size == 1:
        return dataset
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (ImageFolder's class count is read from ``data_dir/train``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}; got {name!r}")
    mean, std = _STATS[name]
    if name == "digits":
        return DatasetInfo(name, 10, 1, 8, mean, std)
    if name in ("cifar10", "cifar100"):
        return DatasetInfo(name, 10 if name == "cifar10" else 100, 3, 32, mean, std)
    classes, _ = torchvision.datasets.folder.find_classes(_require_dir(data_dir, name) / "train")
    return DatasetInfo(name, len(classes), 3, None, mean, std, tuple(classes))


def load_datasets(
    name: str, data_dir: str | os.PathLike | None, img_size: int, aug: Augmentation
) -> tuple[TransformedDataset, TransformedDataset, DatasetInfo]:
    """``(train, test, info)`` for ``name``; train items are augmented, test items only resized and normalized.

    digits needs no files. cifar10/cifar100 read the python-format files under ``data_dir`` (never
    downloading); imagefolder reads ``data_dir/train`` and ``data_dir/val``. A missing or incomplete
    directory raises ``FileNotFoundError`` saying which files are expected where.
    """
    info = dataset_info(name, data_dir)
    if name == "digits":
        train, test = _digits()
    elif name in ("cifar10", "cifar100"):
        train, test = _cifar(name, _require_dir(data_dir, name))
    else:
        root = _require_dir(data_dir, name)
        train = torchvision.datasets.ImageFolder(root / "train", loader=read_image)
        test = torchvision.datasets.ImageFolder(root / "val", loader=read_image)
        if train.classes != test.classes:
            raise ValueError(f"{root}/train and {root}/val must hold the same class folders; got "
                             f"{len(train.classes)} and {len(test.classes)} (first differences: "
                             f"{sorted(set(train.classes) ^ set(test.classes))[:5]})")
    return (TransformedDataset(train, train_transform(info, img_size, aug)),
            TransformedDataset(test, eval_transform(info, img_size)), info)


def read_image(path: str) -> object:
    """An ImageFolder file as an RGB PIL image (torchvision's loader); a file that does not decode raises a
    ValueError naming it (PIL's own errors do not, and a decoder may raise any type on a broken file)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, struct.error, ...: all mean an unreadable file
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _digits() -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.from_numpy(digits.target).long()
    tr, te = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
                              random_state=DIGITS_SPLIT_SEED)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return TensorDataset(images[tr], labels[tr]), TensorDataset(images[te], labels[te])


class _CIFAR10Files(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with presence checks only (no MD5): re-packed copies load too."""

    train_list = [[f, None] for f, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


class _CIFAR100Files(torchvision.datasets.CIFAR100):
    """torchvision's CIFAR-100 reader with presence checks only (no MD5)."""

    train_list = [[f, None] for f, _ in torchvision.datasets.CIFAR100.train_list]
    test_list = [[f, None] for f, _ in torchvision.datasets.CIFAR100.test_list]
    meta = {**torchvision.datasets.CIFAR100.meta, "md5": None}


def cifar_files(name: str) -> tuple[str, list[str]]:
    """``(folder, files)`` a CIFAR data directory must hold: ``DIR/<folder>/<file>``."""
    cls = _CIFAR10Files if name == "cifar10" else _CIFAR100Files
    return cls.base_folder, [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _cifar(name: str, root: Path) -> tuple[Dataset, Dataset]:
    folder, files = cifar_files(name)
    missing = [f for f in files if not os.path.isfile(os.path.join(root, folder, f))]
    if missing:
        raise FileNotFoundError(
            f"{name}: {os.path.join(root, folder)} lacks {', '.join(missing)}. --data-dir must hold the folder "
            f"{folder}/ with the python-format files {', '.join(files)} (unpack "
            f"{'cifar-10' if name == 'cifar10' else 'cifar-100'}-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html there; nothing is downloaded)")
    cls = _CIFAR10Files if name == "cifar10" else _CIFAR100Files
    try:
        return cls(os.fspath(root), train=True, download=False), cls(os.fspath(root), train=False, download=False)
    except Exception as e:  # noqa: BLE001 - any unpickling/reshape failure means unreadable files
        raise ValueError(f"{name}: cannot read the files under {os.path.join(root, folder)}: "
                         f"{type(e).__name__}: {e}") from e


def _require_dir(data_dir: str | os.PathLike | None, name: str) -> Path:
    expected = {
        "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
        "cifar100": "cifar-100-python/ (train, test, meta)",
        "imagefolder": "train/<class>/<image> and val/<class>/<image>",
    }[name]
    if data_dir is None:
        raise ValueError(f"--data-dir is required for dataset {name!r}: a directory holding {expected}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data directory {root} does not exist; it must hold {expected}")
    if name == "imagefolder":
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"imagefolder: {root} lacks {' and '.join(m + '/' for m in missing)}; "
                                    f"it must hold {expected}")
    return root



def batch_mix(mixup: float, cutmix: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix of a whole batch (one of them, at random, per batch when both are on), or None."""
    mixes: list[v2.Transform] = []
    if mixup > 0:
        mixes.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixes.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
