"""The training loop behind ``neuronwise run``: data, model, optimizer, schedule, method callbacks,
evaluation, checkpoints and exact resume.

Epoch order (METHODS.md §1): train → evaluate val/test → method callbacks (which may decide on the
validation loss) → LR schedule (same validation loss) → record → checkpoint. The trainer knows no
method: it builds the registered callbacks that the config names (``methods/``) and calls their
hooks.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuronwise import data as nwdata
from neuronwise import distributed, metrics, models
from neuronwise.io import atomic_write_text

from . import methods
from .components import (
    build_optimizer,
    build_scheduler,
    load_datasets,
    load_scheduler_state,
    resolve_device,
    rng_state,
    scheduler_state,
    seed_everything,
    set_rng_state,
)
from .config import Config
from .distributed_setup import elastic_job, restart_count, run_on_main
from .methods import MethodCallback, MethodContext
from .records import format_record, open_tensorboard, write_scalars
from .rundir import RunDir, RunDirError, check_training_state

CHECKPOINT_FORMAT = 1
# Names the torchrun job that started a run, so that its restarts resume it (and no other job's).
ELASTIC_MARK = ".torchelastic"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or weights; the last good checkpoint is kept."""


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    samples: int


class Trainer:
    """Runs one experiment config in one run directory (rank 0 writes; every rank trains)."""

    def __init__(self, config: Config, run_dir: str, resume: bool = False,
                 progress: bool | None = None, log: Callable[[str], None] | None = None):
        self.config = config
        self.run = RunDir(run_dir)
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._log = log or (lambda line: print(line, flush=True))
        self.history: list[dict] = []
        self.best: dict = {"val_accuracy": -1.0, "epoch": 0}
        self.epoch = 0
        self.start_epoch = 0  # the epoch this process started from (after a resume: the last done)
        self.callbacks: list[MethodCallback] = []
        self.tensorboard = None

    # -- setup ------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if distributed.is_main_process():
            self._log(line)

    def _check_run_dir(self) -> None:
        if self.resume:
            if not self.run.holds_run():
                # E.g. killed before its run directory existed: a requeue that always passes
                # --resume starts the run.
                self.log(f"{self.run.path}: nothing to resume (no run there yet); starting the run")
                self.resume = False
                return
            self.run.check_same_run(self.config)
            # Killed before its first checkpoint: the same config starts over.
            self.resume = self.run.has_checkpoint()
            if not self.resume:
                self.log(f"{self.run.path}: no checkpoint yet (stopped before its first epoch "
                         "ended); starting the run over")
        elif self.run.holds_run():
            raise RunDirError(
                f"{self.run.path}: run directory already holds a run; pass --resume to continue "
                "it, or choose another --run-dir"
            )

    def setup(self) -> None:
        c = self.config
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        self.device = resolve_device(c.train.device)
        seed_everything(c.train.seed)
        rank, world = distributed.rank(), distributed.world_size()
        if c.data.batch_size % world:
            raise ValueError(f"data.batch_size: {c.data.batch_size} is not divisible by the world "
                             f"size {world} (the batch size is global)")
        full_train, self.test_set = load_datasets(c.data)
        self.train_set, self.val_set = nwdata.train_val_split(
            full_train, val_fraction=c.data.val_fraction, seed=c.data.split_seed)
        self.train_loader = nwdata.TensorLoader(
            self.train_set, batch_size=c.data.batch_size // world, shuffle=True,
            augment=c.data.augment, seed=c.train.seed, rank=rank, world_size=world)
        self.val_loader = self._eval_loader(self.val_set)
        self.test_loader = self._eval_loader(self.test_set)

        # Taken from the data, so ImageFolder datasets (no fixed registry shape) work too.
        _, channels, height, _ = full_train.images.shape
        self.model_spec = {"num_classes": int(full_train.num_classes), "in_channels": int(channels),
                           "image_size": int(height)}
        self.model = models.create(c.model.name, **self.model_spec,
                                   **c.model.kwargs).to(self.device)
        if c.train.channels_last:
            # Conv weights in NHWC make convolutions and pooling pick their NHWC kernels (the
            # inputs need no conversion); other tensors are unaffected.
            self.model.to(memory_format=torch.channels_last)
        self.example_input = torch.zeros(1, channels, height, height, device=self.device)
        if c.model.init_from:
            self._load_model_weights(c.model.init_from)
        # The method's callbacks, from their config sections; set up once the optimizer exists.
        self.callbacks = methods.build_callbacks(c)
        self.train_model: nn.Module = self.model
        if distributed.is_distributed():
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=any(cb.needs_unused_parameters for cb in self.callbacks))
        self.optimizer = build_optimizer(c, self.model.parameters())
        self.scheduler = build_scheduler(c, self.optimizer)
        context = MethodContext(
            model=self.model, optimizers=[self.optimizer], device=self.device,
            example_input=self.example_input, validation_loss=self.validation_loss,
            train_set=self.train_set, seed=c.train.seed)
        for callback in self.callbacks:
            callback.setup(context)
        if c.train.compile:
            # The methods hooked self.model; the compiled wrapper runs the same modules, and
            # hooks they add or remove later recompile it (neuronwise._utils.watch_hooks).
            # Evaluation and checkpoints use self.model: the same keys, compiled or not.
            self.train_model = torch.compile(self.train_model)

    def _load_model_weights(self, path: str) -> None:
        from .rundir import load_checkpoint

        state = load_checkpoint(path)["model"]
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            raise RunDirError(f"{path}: model.init_from does not fit model "
                              f"{self.config.model.name!r} ({str(error).splitlines()[0]})") from None

    def _eval_loader(self, dataset):
        # Each rank evaluates a disjoint, unpadded shard; the sums are all-reduced in evaluate().
        world, rank = distributed.world_size(), distributed.rank()
        if world > 1:
            dataset = dataset.subset(torch.arange(rank, len(dataset), world))
        return nwdata.TensorLoader(dataset, batch_size=self.config.data.eval_batch_size)

    # -- loops ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader) -> Evaluation:
        """Mean cross-entropy and top-1 accuracy, summed over ranks (eval mode, mode restored)."""
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            logits = self.model(x)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
            totals[1] += (logits.argmax(1) == y).sum().item()
            totals[2] += y.numel()
        distributed.all_reduce_sum(totals)
        self.model.train(was_training)
        samples = int(totals[2].item())
        if samples == 0:
            return Evaluation(float("nan"), float("nan"), 0)
        return Evaluation(totals[0].item() / samples, 100.0 * totals[1].item() / samples, samples)

    def validation_loss(self) -> float:
        return self.evaluate(self.val_loader).loss

    def train_epoch(self, epoch: int) -> Evaluation:
        self.model.train()
        self.train_loader.set_epoch(epoch)
        totals = torch.zeros(3, dtype=torch.float64)
        batches = self.train_loader
        bar = None
        if self.progress and distributed.is_main_process():
            from tqdm.auto import tqdm

            bar = batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, file=sys.stderr)
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.train_model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"epoch {epoch}: training loss is {loss.item()} (not finite); stopped, "
                    f"the last good checkpoint {self.run.last_path} is kept")
            for callback in self.callbacks:
                callback.before_backward(logits)
            loss.backward()
            for callback in self.callbacks:
                callback.after_backward()
            self.optimizer.step()
            for callback in self.callbacks:
                callback.after_optimizer_step()
            totals[0] += loss.item() * y.numel()
            totals[1] += (logits.detach().argmax(1) == y).sum().item()
            totals[2] += y.numel()
        if bar is not None:
            bar.close()
        # DDP syncs buffers (BN statistics) only at its next forward; evaluation, the callbacks
        # and the checkpoint use rank 0's now, as the next epoch will.
        for buffer in self.model.buffers():
            distributed.broadcast_(buffer)
        distributed.all_reduce_sum(totals)
        samples = int(totals[2].item())
        return Evaluation(totals[0].item() / samples, 100.0 * totals[1].item() / samples, samples)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model_spec": self.model_spec,
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler) if self.scheduler else None,
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "history": self.history,
            "best": self.best,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model_state = state["model"]
        own = self.model.state_dict()
        missing = sorted(set(own) - set(model_state))
        unexpected = sorted(set(model_state) - set(own))
        shapes = [k for k in own if k in model_state and own[k].shape != model_state[k].shape]
        if missing or unexpected or shapes:
            details = []
            if missing:
                details.append(f"missing {missing[:5]}")
            if unexpected:
                details.append(f"unexpected {unexpected[:5]}")
            if shapes:
                details.append("shape mismatch " + ", ".join(
                    f"{k}: {tuple(model_state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in shapes[:5]))
            raise RunDirError(f"{self.run.last_path}: checkpoint does not fit the model "
                              f"({'; '.join(details)})")
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            load_scheduler_state(self.scheduler, state["scheduler"])
        for callback in self.callbacks:
            callback.load_state_dict(state["callbacks"].get(callback.name, {}))
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.epoch = int(state["epoch"])
        set_rng_state(state["rng"])

    def _resume(self, state: dict[str, Any]) -> None:
        """load_state_dict(), with a checkpoint that does not fit this run as one RunDirError."""
        try:
            check_training_state(state, self.run.path, [cb.name for cb in self.callbacks])
            self.load_state_dict(state)
            self.run.check_checkpoint_config(state["config"], self.config)
        except RunDirError:
            raise
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError) as error:
            raise RunDirError(f"{self.run.path}: checkpoint does not fit this run "
                              f"({type(error).__name__}: {error})") from None
        if distributed.is_main_process():
            # A kill between checkpoint and metrics leaves metrics.jsonl an epoch behind.
            self.run.write_metrics(self.history)

    def _save(self) -> None:
        if not distributed.is_main_process():
            return
        self.run.save_last(self.state_dict())
        self.run.write_metrics(self.history)
        if not self._config_recorded:
            # config.yaml follows the checkpoint: a resumed run's changed settings (e.g. epochs)
            # are recorded with its first new checkpoint, not before.
            changed = self.run.update_config(self.config)
            if changed:
                self.log(f"{self.run.config_path}: updated " + ", ".join(changed))
            self.run.write_info(self.config.train.seed, resumed=True)
            self._config_recorded = True

    # -- main -------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        try:
            # Rank 0 checks and locks the run directory while the other ranks wait for its verdict
            # and its path (a default run directory carries rank 0's timestamp).
            path, self.resume = run_on_main(self._open_run_dir)
            self._config_recorded = not self.resume  # a fresh run writes config.yaml below
            if not distributed.is_main_process():
                self.run = RunDir(path)
            self.setup()
            if self.resume:
                # Rank 0 reads the checkpoint and sends it, so ranks need no shared file system.
                self._resume(run_on_main(self.run.load_last))
                if self.config.train.epochs < self.epoch:
                    raise RunDirError(
                        f"train.epochs: {self.config.train.epochs} is fewer than the {self.epoch} "
                        f"epochs that the run in {self.run.path} has finished (a run can be "
                        f"shortened to no fewer epochs than it has trained)")
                self.log(f"resumed {self.run.path} after epoch {self.epoch}")
            elif distributed.is_main_process():
                self.run.write_config(self.config)
                self.run.write_info(self.config.train.seed)
            self.start_epoch = self.epoch
            for callback in self.callbacks:
                callback.on_fit_start()
            if distributed.is_main_process():
                self.tensorboard = open_tensorboard(self.run.path / "tensorboard")
            while self.epoch < self.config.train.epochs:
                self._run_epoch(self.epoch + 1)
            return self.history
        finally:
            # A live DDP wrapper at process-group teardown aborts the worker at exit (torch 2.13).
            # The wrapper sits in a reference cycle, so dropping it frees nothing until the
            # garbage collector runs: collect now, while the process group is still alive.
            self.train_model = getattr(self, "model", None)
            if distributed.is_distributed():
                gc.collect()
            if self.tensorboard is not None:
                self.tensorboard.close()
            self.run.release()

    def _open_run_dir(self) -> tuple[str, bool]:
        """Rank 0: check and lock the run directory; returns its path and whether to resume.

        When torchrun restarts the workers of the job that started this run (``--max-restarts``),
        the run resumes from its last checkpoint, or starts over if it was killed before the first.
        """
        job = elastic_job()
        mark = self.run.path / ELASTIC_MARK
        restarted = (not self.resume and restart_count() > 0 and job is not None
                     and mark.is_file() and mark.read_text(encoding="utf-8") == job)
        if restarted:
            if self.run.config_path.exists():
                self.run.check_same_run(self.config)
            # The killed rank 0 of this job held the lock, possibly on another host.
            self.run.lock_path.unlink(missing_ok=True)
            self.resume = self.run.has_checkpoint()
        else:
            self._check_run_dir()
        self.run.acquire()
        if job is not None and not self.resume:
            atomic_write_text(mark, job)
        return str(self.run.path), self.resume

    def _run_epoch(self, epoch: int) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        train = self.train_epoch(epoch)
        train_time = time.perf_counter() - started
        train_cpu_time = time.process_time() - cpu_started  # this process's CPU, all its threads
        broken = [name for name, tensor in self.model.state_dict().items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if broken:
            raise NonFiniteLossError(
                f"epoch {epoch}: model weights are not finite ({', '.join(broken[:5])}); stopped, "
                f"the last good checkpoint {self.run.last_path} is kept")
        val, test = self.evaluate(self.val_loader), self.evaluate(self.test_loader)
        record = {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train.loss, "train_accuracy": train.accuracy,
            "val_loss": val.loss, "val_accuracy": val.accuracy,
            "test_loss": test.loss, "test_accuracy": test.accuracy,
        }
        for callback in self.callbacks:
            callback.on_epoch_end(record)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val.loss)
        elif self.scheduler is not None:
            self.scheduler.step()
        sparsity = metrics.sparsity_report(self.model, convention="paper")
        neurons = metrics.count_neurons(self.model)
        record.update({
            "params_paper": sparsity["total"], "nonzero_paper": sparsity["nonzero"],
            "remaining_percent_paper": sparsity["remaining_percent"],
            "nonzero_all": metrics.count_nonzero(self.model, convention="all"),
            "neurons_alive": neurons["total"][0], "neurons_total": neurons["total"][1],
            "train_time_s": round(train_time, 4),
            "train_cpu_time_s": round(train_cpu_time, 4),
            "epoch_time_s": round(time.perf_counter() - started, 4),
        })
        self.epoch = epoch
        self.history.append(record)
        if math.isfinite(val.accuracy) and val.accuracy > self.best["val_accuracy"]:
            self.best = {"val_accuracy": val.accuracy, "epoch": epoch,
                         "test_accuracy": test.accuracy}
            if distributed.is_main_process():
                self.run.save_best({"model": self.model.state_dict(), "epoch": epoch,
                                    "model_spec": self.model_spec,
                                    "config": self.config.to_dict()})
        if epoch % self.config.train.checkpoint_every == 0 or epoch == self.config.train.epochs:
            self._save()
        if self.tensorboard is not None:
            write_scalars(self.tensorboard, record)
        self.log(format_record(record, [m for cb in self.callbacks for m in cb.metrics]))
