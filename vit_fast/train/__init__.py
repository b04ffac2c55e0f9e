"""Training: ``vit-fast train`` and ``python -m vit_fast.train``, on one CPU or under ``torchrun`` on many GPUs.

One loop for every dataset: mixed precision through ``torch.autocast`` (fp16 with ``torch.amp.GradScaler``),
AdamW with no weight decay on norms, biases, position embedding and class token (optionally with layer-wise
learning-rate decay), linear warmup then cosine decay stepped per step, gradient clipping, label smoothing,
drop-path, torchvision ``v2`` augmentation and MixUp/CutMix, DDP through ``torch.distributed``.

A run lives in its ``--out`` directory: ``checkpoints/step_NNNNNNNN.pt`` (written atomically, every
``--ckpt-every`` steps and at each epoch end), ``metrics.jsonl`` (one line per step and per evaluation),
``curves.png``, ``model.safetensors`` and ``summary.json``. A run killed at any point continues with
``--resume`` and reaches the same final weights as one that was never interrupted (bitwise on CPU): the
checkpoint holds the model, optimizer, scheduler, scaler and every process's random state, and the batches
are a function of the seed and the step alone (see :mod:`vit_fast.train.data`).

Modules, by job: :mod:`~vit_fast.train.recipes` (the per-dataset recipes and the flags),
:mod:`~vit_fast.train.data` (datasets, augmentation, the sampler), :mod:`~vit_fast.train.models` (``--model``
to a network), :mod:`~vit_fast.train.optim` (AdamW groups, schedule), :mod:`~vit_fast.train.trainer` (the
loop), :mod:`~vit_fast.train.checkpoints`, :mod:`~vit_fast.train.metrics` (metrics.jsonl, curves.png),
:mod:`~vit_fast.train.distributed` (torchrun, DDP) and :mod:`~vit_fast.train.run` (the entry points).
"""

from vit_fast.train.checkpoints import list_checkpoints, load_newest_checkpoint
from vit_fast.train.metrics import plot_curves, read_metrics
from vit_fast.train.optim import param_groups
from vit_fast.train.recipes import RECIPES, add_train_arguments, build_parser, resolve
from vit_fast.train.run import main, run_from_args, train

__all__ = [
    "RECIPES",
    "add_train_arguments",
    "build_parser",
    "list_checkpoints",
    "load_newest_checkpoint",
    "main",
    "param_groups",
    "plot_curves",
    "read_metrics",
    "resolve",
    "run_from_args",
    "train",
]
