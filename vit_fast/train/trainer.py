"""One training process: :class:`Trainer` sets up data, model and optimizer (or restores them from a
checkpoint), runs the loop, evaluates, checkpoints and writes the run's outputs."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import vit_fast
from vit_fast.cpu_features import training_precision
from vit_fast.fileio import atomic_write
from vit_fast.model import count_params
from vit_fast.train import data
from vit_fast.train.checkpoints import (
    Progress,
    full_model_state,
    list_checkpoints,
    load_newest_checkpoint,
    read_checkpoint,
    restore_model_and_optimizer,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    save_weights,
    seed_process,
    set_rng_state,
    sharded_state,
    tidy_for_resume,
)
from vit_fast.train.distributed import (
    Dist,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast,
    gather,
    local_world_size,
    shard_model,
    wrap_model,
)
from vit_fast.train.memory import estimate_for_model, peak_bytes, resident_bytes, state_bytes
from vit_fast.train.metrics import MetricsLog, plot_curves, read_metrics, truncate_metrics
from vit_fast.train.models import build_model, config_of, default_img_size, enable_grad_checkpointing, family_of
from vit_fast.train.optim import build_optimizer, build_scheduler
from vit_fast.train.preemption import Preempted, StopSignals, ignore_stop_signals, shut_down_workers
from vit_fast.train.recipes import adopt_saved_recipe, parse_overrides, recipe_of, resolve, resolve_precision


class _Step(NamedTuple):
    """A step waiting in the window for its loss to be read back from the device."""

    step: int
    epoch: int
    lr: float
    stats: torch.Tensor  # (2,): loss, correct predictions
    skipped: bool


class Trainer:
    """One training process: its data, model, optimizer and counters; :meth:`fit` runs the loop."""

    def __init__(self, args: argparse.Namespace, d: Dist, t0: float, stop: StopSignals | None = None) -> None:
        self.d, self.t0, self.stop = d, t0, stop
        self.sharded = args.strategy == "fsdp"
        self._locate_run(args)
        ckpt = self._previous_run(args)
        self.args = resolve(args)
        self._configure_process(workers_given=args.workers is not None)
        self._build_data()
        self.rss_before = resident_bytes()  # what the model, optimizer and steps add is measured from here
        self._build_model(fresh=ckpt is None)
        self._build_optimization()
        self._start_or_restore(ckpt)
        self.train_model = wrap_model(self.model, d, self.args.compile, self.args.strategy)

    # ---------------------------------------------------------------------------------------- set-up

    def _locate_run(self, args: argparse.Namespace) -> None:
        stamp = broadcast(time.strftime("%Y%m%d-%H%M%S"), self.d)  # the first process's clock names the run
        self.out = Path(args.out or f"runs/{args.dataset or 'digits'}-{stamp}")
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"

    def _previous_run(self, args: argparse.Namespace) -> dict | None:
        """The checkpoint to resume from (with its recipe put into ``args``), or None for a fresh run."""
        # The first process decides: the others would see the files it is about to create.
        has_run = broadcast(bool(list_checkpoints(self.ckpt_dir)) or self.metrics_path.exists(), self.d)
        if not args.resume:
            if has_run:
                raise ValueError(f"{self.out} already holds a run: pass --resume to continue it, or another --out")
            if self.d.main:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            return None
        if args.out is None:
            raise ValueError("--resume needs --out, the directory of the run to continue")
        ckpt = None
        if self.d.main:  # the first process picks, so that every process resumes from the same checkpoint
            ckpt = load_newest_checkpoint(self.ckpt_dir)
            tidy_for_resume(self.ckpt_dir, ckpt)
            truncate_metrics(self.metrics_path, None if ckpt is None else ckpt["step"])
        chosen = broadcast(None if ckpt is None else ckpt["path"], self.d)
        if not self.d.main and chosen is not None:
            ckpt = read_checkpoint(chosen)
        if ckpt is not None:
            adopt_saved_recipe(args, ckpt["recipe"])
        return ckpt

    def _configure_process(self, workers_given: bool) -> None:
        """Process-wide settings: loader workers, the ops' backend, CPU threads, precision."""
        a = self.args
        if not workers_given:  # the recipe's count, but no more than this process's share of the cores
            a.workers = min(a.workers, max(1, (os.cpu_count() or 1) // local_world_size() - 1))
        if a.backend != "auto":
            vit_fast.set_backend(a.backend)
        if a.threads:
            torch.set_num_threads(a.threads)
        self.precision = resolve_precision(a.precision, self.d.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def _build_data(self) -> None:
        """Datasets at the run's resolution (the flag's, else the dataset's, else the model's), their loaders
        and the batch mix."""
        a, d = self.args, self.d
        aug = data.Augmentation(
            crop=a.crop, crop_padding=a.crop_padding, crop_scale=a.crop_scale, hflip=a.hflip,
            color_jitter=a.color_jitter, randaugment_ops=a.randaugment_ops,
            randaugment_magnitude=a.randaugment_magnitude, random_erasing=a.random_erasing)
        model_size = default_img_size(a.model)
        self.img_size = a.img_size or data.dataset_info(a.dataset, a.data_dir).img_size or model_size
        train_set, test_set, self.info = data.load_datasets(a.dataset, a.data_dir, self.img_size, aug)
        self.sizes = (len(train_set), len(test_set))
        self.sampler = data.TrainSampler(train_set, batch_size=a.batch_size, seed=a.seed, rank=d.rank,
                                         world_size=d.world_size)
        self.train_loader = self._loader(train_set, self.sampler)
        self.test_loader = self._loader(data.shard(test_set, d.rank, d.world_size))
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = a.epochs * self.steps_per_epoch
        self.mix = data.batch_mix(a.mixup, a.cutmix, self.info.num_classes)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        a = self.args
        # An own generator: creating a loader iterator then leaves the model's random stream untouched.
        return DataLoader(dataset, batch_size=self.sampler.local_batch, sampler=sampler, num_workers=a.workers,
                          pin_memory=self.d.device.type == "cuda", persistent_workers=a.workers > 0,
                          generator=torch.Generator().manual_seed(a.seed), worker_init_fn=ignore_stop_signals)

    def _build_model(self, fresh: bool) -> None:
        """The network, on the device; ``--init`` weights only in a fresh run (a resumed one has its own)."""
        a = self.args
        torch.manual_seed(a.seed)  # the same initial weights in every process and every run with this seed
        model = build_model(a.model, num_classes=self.info.num_classes, in_chans=self.info.in_chans,
                            img_size=self.img_size, drop_path=a.drop_path, overrides=parse_overrides(a.override),
                            init=a.init if fresh else None)
        if a.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.model = model.to(self.d.device)
        if a.precision == "auto" and self.d.device.type == "cpu":  # bf16 only where it is measured faster here
            self.precision = broadcast(training_precision(self.model, self.sampler.local_batch, self.info.in_chans,
                                                          self.img_size) if self.d.main else None, self.d)
            self.amp_dtype = {"bf16": torch.bfloat16}.get(self.precision)
        if self.sharded:  # before the optimizer is built: sharding replaces the parameters with DTensor shards
            shard_model(self.model, self.d, precision=self.precision, compile=a.compile, cpu_offload=a.cpu_offload)

    def _build_optimization(self) -> None:
        a, device = self.args, self.d.device
        self.optimizer = build_optimizer(self.model, a, device)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         round(a.warmup_epochs * self.steps_per_epoch), a.min_lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    def _start_or_restore(self, ckpt: dict | None) -> None:
        self.progress = Progress()
        self.window: list[_Step] = []
        self.epoch_losses: list[float] = []
        self.memory: dict | None = None  # this process's state bytes after its first step, then the logged record
        self.saved_step = -1
        if ckpt is None:
            seed_process(self.args.seed, self.d.rank)
        else:
            self._restore(ckpt)
            self.saved_step = self.progress.step

    def _restore(self, ckpt: dict) -> None:
        restore_model_and_optimizer(ckpt, self.model, self.optimizer, self.sharded)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress.from_checkpoint(ckpt)
        self._restore_rng(ckpt["rng"])
        if self.d.main:
            print(f"resuming {self.out} from step {self.progress.step} ({ckpt['path']})", file=sys.stderr)

    def _restore_rng(self, states: list[dict]) -> None:
        d = self.d
        if len(states) == d.world_size:
            set_rng_state(states[d.rank], d.device)
            return
        warnings.warn(f"the checkpoint was written by {len(states)} processes, this run has {d.world_size}: the "
                      "random streams restart, so the run is not bitwise the same as an uninterrupted one",
                      stacklevel=2)
        seed_process(self.args.seed + self.progress.step, d.rank)

    # ------------------------------------------------------------------------------------------- loop

    def fit(self) -> dict:
        """Train the remaining epochs, each ending with an evaluation and a checkpoint; returns the summary."""
        self.log = MetricsLog(self.metrics_path, self.d.main)
        self.bar = self._progress_bar()
        try:
            try:
                start_epoch, start_batch = divmod(self.progress.step, self.steps_per_epoch)
                for epoch in range(start_epoch, self.args.epochs):
                    self._run_epoch(epoch, start_batch if epoch == start_epoch else 0)
            finally:
                self.bar.close()
                self.log.close()
            return self._finish()
        finally:
            shut_down_workers(self.train_loader, self.test_loader)

    def _progress_bar(self) -> tqdm:
        a, d = self.args, self.d
        bar = tqdm(total=self.total_steps, initial=self.progress.step, unit="step", dynamic_ncols=True,
                   mininterval=1.0, desc=f"{a.dataset} {a.model}", disable=not (d.main and a.progress))
        if d.main:
            bar.write(f"{a.dataset}: {self.sizes[0]} training / {self.sizes[1]} test images; {a.model} at "
                      f"{self.img_size}px, {count_params(self.model) / 1e6:.2f}M params; {self.precision} on "
                      f"{d.device} x{d.world_size}; {a.epochs} epochs of {self.steps_per_epoch} steps, batch "
                      f"{a.batch_size}; run directory {self.out}")
        return bar

    def _run_epoch(self, epoch: int, start_batch: int) -> None:
        a = self.args
        self.sampler.set_epoch(epoch, start_batch)
        self.epoch_losses = []
        self.t_window = time.perf_counter()
        for images, labels in self.train_loader:
            self._train_step(images, labels, epoch)
            self.bar.update(1)
            step = self.progress.step
            if step % a.log_every == 0:
                self._flush()
            if a.ckpt_every and step % a.ckpt_every == 0 and step % self.steps_per_epoch:
                self._flush()
                self._save_checkpoint(epoch)
                self.t_window = time.perf_counter()
            # an epoch's last step goes on to its evaluation and checkpoint, and the stop is taken after them
            if step % self.steps_per_epoch and (signum := self._stop_agreed()):
                self._flush()
                self._stop(signum, epoch)
        self._flush()
        self.progress.last_eval = self.evaluate() | {"epoch": epoch + 1, "step": self.progress.step}
        self._log_epoch(epoch)
        self._save_checkpoint(epoch + 1)
        if epoch + 1 < a.epochs and (signum := self._stop_agreed()):
            self._stop(signum, epoch + 1)

    def _stop_agreed(self) -> int:
        """The signal any process received (0: none), agreed by all after the same step."""
        return all_reduce_max(self.stop.received if self.stop is not None else 0, self.d)

    def _stop(self, signum: int, epoch: int) -> None:
        """Checkpoint this step (unless just done) and end the run with :class:`Preempted`."""
        if self.saved_step != self.progress.step:
            self._save_checkpoint(epoch)
        raise Preempted(signum, self.progress.step, os.fspath(self._checkpoint_path(self.progress.step)))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        a, d = self.args, self.d
        images = images.to(d.device, non_blocking=True)
        labels = labels.to(d.device, non_blocking=True)
        targets = labels
        if self.mix is not None:  # MixUp/CutMix draw on the CPU, from a seed of the step alone
            with data.seeded(data.derive_seed(a.seed, data.STREAM_MIX, self.progress.step, d.rank)):
                images, targets = self.mix(images, labels)
        with self._autocast():
            logits = self.train_model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=a.label_smoothing)
        lr, skipped = self._optimizer_step(loss)
        correct = (logits.detach().argmax(-1) == labels).sum()
        self.progress.step += 1
        stats = torch.stack([loss.detach(), correct.float()])
        self.window.append(_Step(self.progress.step, epoch, lr, stats, skipped))

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Backward, clip, step and schedule; returns the step's learning rate and whether it was skipped."""
        clip = self.args.clip_grad
        self.scaler.scale(loss).backward()
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        lr = max(self.scheduler.get_last_lr())
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.memory is None:  # every state exists now, the gradients until zero_grad below
            self.memory = state_bytes(self.model, self.optimizer)
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale  # fp16 overflow: step skipped
        self.progress.skipped += skipped
        with warnings.catch_warnings():
            # the schedule counts steps, skipped ones too; PyTorch warns when the first one was skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, skipped

    def _flush(self) -> None:
        """Read the window's losses back (one sync), stop on NaN/Inf, and log every step of it."""
        if not self.window:
            return
        d, batch = self.d, self.args.batch_size
        stats = all_reduce_sum(torch.stack([w.stats for w in self.window]).double(), d)  # (steps, 2)
        elapsed = time.perf_counter() - self.t_window
        self.progress.train_s += elapsed
        self.progress.train_images += len(self.window) * batch
        img_s = len(self.window) * batch / max(elapsed, 1e-9)
        records = []
        for w, (loss_sum, correct) in zip(self.window, stats.tolist(), strict=True):
            loss = loss_sum / d.world_size
            if not math.isfinite(loss):
                self.log.write(records)
                raise FloatingPointError(
                    f"the training loss is {loss} at step {w.step} (epoch {w.epoch + 1}): the run diverged. Its "
                    f"last checkpoint is in {self.ckpt_dir}; try a lower --lr, a longer --warmup-epochs, "
                    "--clip-grad, or --precision bf16/fp32")
            self.epoch_losses.append(loss)
            rec = {"kind": "train", "step": w.step, "epoch": w.epoch + 1, "loss": loss, "acc": correct / batch,
                   "lr": w.lr, "img_s": img_s}
            if w.skipped:
                rec["skipped"] = True
            records.append(rec)
        self.log.write(records)
        self._show(records[-1])
        self.window = []
        if self.memory is not None and "kind" not in self.memory:
            self._log_memory(records[-1]["step"])
        self.t_window = time.perf_counter()

    def _log_memory(self, step: int) -> None:
        """One metrics line: every process's state bytes and peak memory so far, beside the estimate."""
        a, d = self.args, self.d
        peak, how = peak_bytes(d.device, self.rss_before)
        per_rank = gather({**self.memory, "peak": peak}, d)
        est = estimate_for_model(self.model, strategy=a.strategy, world_size=d.world_size,
                                 compute_bytes=2 if self.amp_dtype is not None else 4, offload=a.cpu_offload)
        self.memory = {"kind": "memory", "step": step, "strategy": a.strategy, "world_size": d.world_size,
                       "state_bytes": [{k: r[k] for k in ("weights", "grads", "optimizer")} for r in per_rank],
                       "peak_bytes": [r["peak"] for r in per_rank], "peak_measure": how,
                       "estimate": {"weights": est.weights, "grads": est.grads, "optimizer": est.optimizer,
                                    "transient": est.transient}}
        self.log.write([self.memory])

    def _show(self, rec: dict) -> None:
        post = {"loss": f"{rec['loss']:.4f}", "acc": f"{rec['acc']:.3f}", "lr": f"{rec['lr']:.2e}",
                "img/s": f"{rec['img_s']:.0f}"}
        if self.progress.skipped:
            post["skipped"] = self.progress.skipped
        self.bar.set_postfix(post, refresh=False)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test loss, top-1 and top-5 accuracy over the whole test set (each process scores its shard)."""
        d = self.d
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # loss, top-1, top-5, images
        k = min(5, self.info.num_classes)
        for images, labels in self.test_loader:
            images, labels = images.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            with self._autocast():
                logits = self.model(images)
            hits = logits.topk(k, dim=-1).indices == labels[:, None]  # (B, k)
            sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum").double(),
                                 hits[:, 0].sum().double(), hits.any(-1).sum().double(),
                                 torch.tensor(float(len(labels)), dtype=torch.float64, device=d.device)])
        if self.sharded:  # every forward all-gathers: a process with a shorter shard joins the others' last ones
            batches = len(self.test_loader)
            blank = torch.zeros(1, self.info.in_chans, self.img_size, self.img_size, device=d.device)
            for _ in range(all_reduce_max(batches, d) - batches):
                with self._autocast():
                    self.model(blank)
        self.model.train()
        loss, top1, top5, n = all_reduce_sum(sums, d).tolist()
        return {"test_loss": loss / n, "test_top1": top1 / n, "test_top5": top5 / n}

    def _log_epoch(self, epoch: int) -> None:
        if not self.d.main:
            return
        e, p = self.progress.last_eval, self.progress
        self.log.write([{"kind": "eval", **e}])
        train_loss = sum(self.epoch_losses) / max(len(self.epoch_losses), 1)
        self.bar.write(f"epoch {epoch + 1}/{self.args.epochs}  step {p.step}  train loss {train_loss:.4f}  "
                       f"test loss {e['test_loss']:.4f}  top-1 {e['test_top1']:.2%}  top-5 {e['test_top5']:.2%}  "
                       f"{p.images_per_s:.0f} img/s  {self._wall():.0f} s")

    def _wall(self) -> float:
        return self.progress.wall_before + time.perf_counter() - self.t0

    def _checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / (f"step_{step:08d}" if self.sharded else f"step_{step:08d}.pt")

    def _save_checkpoint(self, epoch: int) -> None:
        """Every process's random state is gathered; under FSDP every process writes its shards and the first
        the rest, otherwise the first process writes it all. A failed write raises in every process."""
        a, d = self.args, self.d
        states = gather(rng_state(d.device), d)
        state = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": states,
                 "epoch": epoch, "config": config_of(self.model), "recipe": recipe_of(a), "strategy": a.strategy,
                 "world_size": d.world_size, **self.progress.to_checkpoint(self._wall())}
        if self.sharded:
            tensors, param_groups = sharded_state(self.model, self.optimizer)
            save_sharded_checkpoint(self.ckpt_dir, self.progress.step, tensors,
                                    {**state, "param_groups": param_groups} if d.main else None, a.keep_ckpts, d)
        else:
            failure = None
            if d.main:
                try:
                    save_checkpoint(self.ckpt_dir, {"model": self.model.state_dict(),
                                                    "optimizer": self.optimizer.state_dict(), **state},
                                    keep=a.keep_ckpts)
                except OSError as e:
                    failure = e
            failure = broadcast(failure, d)  # the others must not wait in a collective the first one left
            if failure is not None:
                raise failure
        self.saved_step = self.progress.step

    # ---------------------------------------------------------------------------------------- outputs

    def _finish(self) -> dict:
        """The first process writes the weights, the curves and the summary; returns the summary."""
        barrier(self.d)
        weights = full_model_state(self.model, self.sharded)  # under FSDP a collective: every process gathers
        if not self.d.main:
            return {}
        a = self.args
        save_weights(self.out / "model.safetensors", weights, config_of(self.model), dataset=a.dataset, model=a.model)
        title = f"{a.model} on {a.dataset} ({self.precision}, {a.epochs} epochs, batch {a.batch_size})"
        plot_curves(read_metrics(self.metrics_path), self.out / "curves.png", title)
        summary = self._summary()
        atomic_write(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        e = self.progress.last_eval or {}
        skipped = f", {self.progress.skipped} fp16 overflow steps skipped" if self.precision == "fp16" else ""
        print(f"{a.dataset} {a.model}: test top-1 {e.get('test_top1', float('nan')):.2%}  "
              f"top-5 {e.get('test_top5', float('nan')):.2%} after {a.epochs} epochs ({self.progress.step} steps)"
              f"{skipped}; {summary['train_images_per_s']:.0f} img/s, wall {summary['wall_s']:.0f} s -> {self.out}")
        return summary

    def _summary(self) -> dict:
        a, d, p = self.args, self.d, self.progress
        e = p.last_eval or {}
        return {
            "dataset": a.dataset, "model": a.model, "precision": self.precision, "device": str(d.device),
            "world_size": d.world_size, "epochs": a.epochs, "steps": p.step, "batch_size": a.batch_size,
            "test_top1": e.get("test_top1"), "test_top5": e.get("test_top5"), "test_loss": e.get("test_loss"),
            "train_images_per_s": p.images_per_s, "train_s": p.train_s,
            "wall_s": self._wall(), "skipped_steps": p.skipped, "params": count_params(self.model),
            "img_size": self.img_size, "in_chans": self.info.in_chans, "num_classes": self.info.num_classes,
            "classes": self.info.classes and list(self.info.classes),  # vit-fast predict's label names
            "model_family": family_of(self.model), "config": config_of(self.model),
            "recipe": recipe_of(a), "strategy": a.strategy, "memory": self.memory,
            "vit_fast": vit_fast.__version__, "torch": torch.__version__,
        }
