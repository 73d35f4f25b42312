"""The one training loop every method runs on.

Per optimizer step: `accumulate` micro-batches -> method.training_step (the forward of DistributedDataParallel under
torchrun, gradients averaged in buckets during the last micro-batch's backward; `no_sync` before; with train.strategy
fsdp the forward of the method sharded in place, engine/fsdp.py) under autocast ->
backward -> unscale, clip -> optimizer step -> schedule -> method hooks -> EMA -> log -> checkpoint.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..common.device import (autocast_context, configure_cuda_backends, resolve_device,  # noqa: F401
                             resolve_precision)  # resolve_device: public here too
from ..common.metrics import ClassificationTally, predict
from ..data.fileset import Images, image_batches
from ..data.pipeline import PreparedData
from ..data.stream import BadImageLog
from ..errors import CheckpointError, TrainingError, TrainingInterrupted
from ..methods.base import Method, Progress
from ..models.heads import init_head
from . import distributed as dist
from . import fsdp
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, safe_load
from .compile import CompiledForward
from .ema import ModelEMA
from .loading import bad_image_log, build_loader
from .loggers import JsonlLogger, Loggers, progress
from .optim import build_optimizer, lr_scaling_message
from .schedule import LrSchedule


@contextmanager
def catch_stop_signals(trainer: "Trainer"):
    """While training, SIGINT and SIGTERM only set trainer._stop_signal (a second SIGINT interrupts at once).
    Handlers are installed from the main thread only and restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signal_number, frame):
        if trainer._stop_signal is not None and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        trainer._stop_signal = signal_number
        print(f"\n[ssl-kit] signal {signal_number}: saving a checkpoint at the end of this step "
              f"(Ctrl-C again to abort now)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class RunContext:
    """What a stage's trainer writes to: the run dir, loggers, the seed, and test hooks."""

    run_dir: Path
    seed: int
    loggers: Optional[Loggers] = None  # wandb and TensorBoard (rank 0)
    metrics: Optional[JsonlLogger] = None
    step_callback: Optional[Callable[[int], None]] = None  # tests: simulate a crash at a given step
    extra_meta: dict = field(default_factory=dict)


def uses_channels_last(setting: Optional[bool], device: torch.device) -> bool:
    """train.channels_last: the setting, or for None whether the device is the CPU (where oneDNN's NHWC convolutions
    are faster; not measured on GPUs here, so CUDA keeps the default layout unless asked)."""
    return device.type == "cpu" if setting is None else setting


class Trainer:
    """Trains `method` on `data` per the stage config; checkpoint at ctx.run_dir/checkpoints/last.pt."""

    def __init__(self, method: Method, data: PreparedData, cfg, ctx: RunContext, backbone_meta: dict) -> None:
        self.cfg, self.ctx, self.data = cfg, ctx, data
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        if self.device.type == "cuda":
            configure_cuda_backends(cfg.train.tf32, cfg.train.cudnn_benchmark)
        self.distributed = dist.init_from_env(str(self.device))
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.backbone_meta = backbone_meta
        self.checkpoint_path = ctx.run_dir / "checkpoints" / "last.pt"

        for module in method.head_modules():
            init_head(module, cfg.train.head_init)
        if cfg.backbone.sync_bn and self.distributed:
            if self.device.type != "cuda":
                raise TrainingError(f"stages[{cfg.name}].backbone.sync_bn needs CUDA devices (torch's SyncBatchNorm "
                                    f"under DistributedDataParallel is GPU-only); on the CPU set "
                                    f"backbone.sync_bn=false")
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.method = method.to(self.device)
        if uses_channels_last(cfg.train.channels_last, self.device) and not self._fsdp_keeps_layout():
            self.method.to(memory_format=torch.channels_last)  # 4-D weights only; saved records are contiguous

        tc = cfg.train
        if tc.batch_size % (tc.accumulate * self.world):
            raise TrainingError(f"train.batch_size {tc.batch_size} must be divisible by accumulate × world size "
                                f"({tc.accumulate} × {self.world})")
        if tc.batch_size > len(data.labeled) and not method.data_needs(cfg).unlabeled:
            raise TrainingError(f"train.batch_size {tc.batch_size} is larger than the {len(data.labeled)} training "
                                f"images; lower it")
        self.loader = build_loader(method, data, cfg, ctx.seed, self.rank, self.world, self.device)
        self.bad_log = bad_image_log(self.loader)
        self.test_bad_files: dict[str, str] = {}  # bad files of a streamed held-out test split: path -> reason
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total_steps = tc.steps or max(1, math.ceil(tc.epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(method.parameter_groups(), cfg.optimizer, tc.batch_size, self.device)
        self.schedule = LrSchedule(cfg.schedule, self.total_steps, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16" and self.device.type == "cuda")
        target = method.ema_target()
        self.ema = ModelEMA(target, tc.ema_decay) if (tc.ema_decay and target is not None) else None
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model: nn.Module = method  # what a micro-step calls: the method, or DDP around it
        self.fsdp = self._shard_fsdp(method)  # train.strategy fsdp: the method sharded in place (engine/fsdp.py)
        if self.distributed and not self.fsdp:
            self.model = dist.wrap_ddp(method, self.device, self.params, dist.find_unused_parameters(cfg))
        self.forward = CompiledForward(self.model, method, tc, cfg.name)  # self.model itself unless train.compile
        if self.is_main:
            print(f"[ssl-kit] {cfg.name}: {lr_scaling_message(cfg.optimizer, tc.batch_size)}; precision "
                  f"{self.precision} on {self.device.type}", file=sys.stderr, flush=True)
        self.step = 0
        self._epoch_losses: list[torch.Tensor] = []
        self._previewed = False  # the first step shows its augmented views to the loggers
        self._bad_step = torch.tensor(-1, device=self.device)  # first step with a non-finite loss/grad, -1: none
        self._bad_terms: dict[str, torch.Tensor] = {}
        self._stop_signal: Optional[int] = None

    # ------------------------------------------------------------------------------------- fsdp
    def _shard_fsdp(self, method: Method) -> bool:
        """train.strategy fsdp under torchrun: refuse what cannot run sharded, then fully_shard the method in place
        and point self.params at its sharded parameters. -> sharded? (False for ddp and for one process)"""
        tc = self.cfg.train
        if tc.strategy != "fsdp" or not fsdp.check_supported(self.cfg, self.distributed):
            return False
        if tc.compile != "none":
            raise TrainingError(f"stages[{self.cfg.name}]: train.compile {tc.compile!r} is not supported with "
                                f"train.strategy fsdp; set train.compile none or use train.strategy: ddp")
        fsdp.shard_method(method, self.optimizer, self.params)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return True

    def _fsdp_keeps_layout(self) -> bool:
        """Whether the weights keep their contiguous layout for fully_shard, which shards contiguous parameters only:
        train.channels_last unset means contiguous under fsdp; set true, it is refused."""
        if self.cfg.train.strategy != "fsdp" or not self.distributed:
            return False
        if self.cfg.train.channels_last:
            raise TrainingError(f"stages[{self.cfg.name}]: train.channels_last true is not supported with "
                                f"train.strategy fsdp (fully_shard shards contiguous weights only); leave it unset "
                                f"or use train.strategy: ddp")
        return True

    def _gradient_sync(self, last_micro: bool):
        """The context of one micro-batch's backward: gradients reduced only in the last one (DDP's no_sync,
        FSDP's set_requires_gradient_sync)."""
        if self.fsdp:
            return fsdp.gradient_sync(self.method, last_micro)
        return self.model.no_sync() if self.distributed and not last_micro else nullcontext()

    def _update_ema(self) -> None:
        """train.ema_decay: the (replicated) EMA copy follows the EMA target, gathered when sharded."""
        if self.fsdp:
            fsdp.update_ema(self.ema.module, self.ema.decay, self.method.ema_target())
        else:
            self.ema.update(self.method.ema_target())

    # ------------------------------------------------------------------------------------ state
    def state_dict(self, full: Optional[tuple[dict, dict]] = None) -> dict:
        """The checkpoint; `full`: the (model, optimizer) full state dicts gathered from a sharded method."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        model_state, optimizer_state = full if full is not None else (self.method.state_dict(),
                                                                      self.optimizer.state_dict())
        return {
            "format": CHECKPOINT_FORMAT, "version": 1, "stage": self.cfg.name, "step": self.step,
            "total_steps": self.total_steps, "world_size": self.world,
            **({"strategy": "fsdp"} if full is not None else {}),
            "method": model_state, "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(), "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None, "rng": rng,
            "epoch_losses": [float(v) for v in self._epoch_losses], "backbone": self.backbone_meta,
            "bad_images": self._bad_state(),
        }

    def _bad_state(self) -> Optional[dict]:
        """The streamed bad-file log (files, reads), so a resumed run counts and stops as the uninterrupted one."""
        if self.bad_log is None:
            return None
        return {"files": [[n, r] for n, r in self.bad_log.files.items()], "reads": self.bad_log.reads,
                "bad_reads": self.bad_log.bad_reads,
                "all_files": [[n, r] for n, r in self.bad_log.all_files.items()]}

    def save_checkpoint(self) -> None:
        """checkpoints/last.pt (atomically); with train.keep_last = N > 1 also step-<step>.pt, oldest removed.
        Sharded (fsdp), every rank takes part in gathering the full state dicts."""
        full = fsdp.full_state(self.method, self.optimizer) if self.fsdp else None
        if not self.is_main:
            return
        state = self.state_dict(full)
        atomic_save(state, self.checkpoint_path)
        keep = self.cfg.train.keep_last
        if keep > 1:
            atomic_save(state, self.checkpoint_path.parent / f"step-{self.step:09d}.pt")
            snapshots = sorted(self.checkpoint_path.parent.glob("step-*.pt"))
            for old in snapshots[:max(0, len(snapshots) - (keep - 1))]:
                old.unlink()

    def load_checkpoint(self, state: dict) -> None:
        if state.get("stage") != self.cfg.name:
            raise CheckpointError(f"checkpoint is of stage {state.get('stage')!r}, not {self.cfg.name!r}")
        if state.get("world_size", 1) != self.world:
            raise CheckpointError(
                f"checkpoint was written by {state.get('world_size')} processes, this run has {self.world}: the data "
                f"order and per-rank batch would differ; resume with the same world size")
        self._load_networks(state)
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        if self.bad_log is not None and state.get("bad_images"):
            saved = state["bad_images"]
            self.bad_log.files = {name: reason for name, reason in saved["files"]}
            self.bad_log.reads, self.bad_log.bad_reads = int(saved["reads"]), int(saved["bad_reads"])
            self.bad_log.all_files = {name: reason for name, reason in saved.get("all_files", [])}
        self._epoch_losses = [torch.tensor(v, device=self.device) for v in state.get("epoch_losses", [])]

    def _load_networks(self, state: dict) -> None:
        """The method's and optimizer's state; a checkpoint resumes only under the strategy that wrote it (their
        optimizer states differ in layout: parameter indices under ddp, names under fsdp)."""
        kinds = {"ddp": "unsharded (train.strategy ddp, or one process)", "fsdp": "sharded (train.strategy fsdp "
                                                                                 "under torchrun)"}
        saved = state.get("strategy", "ddp")
        if saved != ("fsdp" if self.fsdp else "ddp"):
            raise CheckpointError(f"checkpoint was written {kinds[saved]}, this run is "
                                  f"{kinds['fsdp' if self.fsdp else 'ddp']}; resume as the run that wrote it")
        try:
            if self.fsdp:
                fsdp.load_full_state(self.method, self.optimizer, state["method"], state["optimizer"])
            else:
                self.method.load_state_dict(state["method"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint does not fit this stage's networks: {str(exc).splitlines()[0]}") from None
        if not self.fsdp:
            self.optimizer.load_state_dict(state["optimizer"])

    def try_resume(self) -> bool:
        """Continue from checkpoints/last.pt when it belongs to this stage. -> resumed? Under torchrun rank 0 reads
        it and broadcasts it: other nodes need not share rank 0's filesystem."""
        state = None
        if self.is_main and self.checkpoint_path.is_file():
            state = safe_load(self.checkpoint_path)
        state = dist.broadcast_object(state)
        if state is None or state.get("stage") != self.cfg.name:
            return False
        self.load_checkpoint(state)
        return True

    # ------------------------------------------------------------------------------------- loop
    def _set_lr(self) -> float:
        self.schedule.apply(self.optimizer.param_groups, self.step)
        return self.optimizer.param_groups[0]["lr"]

    def _progress(self) -> Progress:
        return Progress(self.step, self.total_steps, self.step // self.steps_per_epoch, self.steps_per_epoch)

    def _raise_non_finite(self, step: int, terms: dict) -> None:
        kept = f"; the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path.is_file() else ""
        raise TrainingError(f"stage {self.cfg.name!r}: loss is {terms.get('loss')} at step {step} "
                            f"(terms: {terms}){kept}. Lower the learning rate or enable train.clip_grad_norm")

    def _check_pending(self) -> None:
        """Raise for the first step since the last check whose loss or gradients were not finite. Checked at every
        log and checkpoint boundary (not every step: on a GPU each check is a device sync), always before a
        checkpoint is written, so the last checkpoint on disk is always a good one."""
        bad = int(self._bad_step)
        if bad >= 0:
            self._raise_non_finite(bad, {k: float(v) for k, v in self._bad_terms.items()})

    def _note_finite(self, outputs: dict, grad_norm: Optional[torch.Tensor] = None) -> None:
        """Record on the device (no sync) the first step whose loss or gradient norm is not finite."""
        finite = torch.isfinite(outputs["loss"].detach())
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        first = ~finite & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.tensor(self.step, device=finite.device), self._bad_step)
        for key, value in outputs.items():
            if torch.is_tensor(value) and value.numel() == 1:
                previous = self._bad_terms.get(key, torch.zeros((), device=finite.device))
                self._bad_terms[key] = torch.where(first, value.detach().float(), previous)

    def _train_step(self) -> dict:
        """One optimizer step. -> logs as 0-d tensors (no device sync here)."""
        tc = self.cfg.train
        lr = self._set_lr()
        progress_info = self._progress()
        logs: dict[str, torch.Tensor] = {}
        for micro in range(tc.accumulate):
            batch = self.loader.batch(self.step, micro, tc.accumulate)
            if micro == 0 and not self._previewed:
                self._preview(batch)
            if self.distributed:  # per-rank views, crops and masks, a pure function of the step
                torch.manual_seed(dist.step_seed(self.ctx.seed, self.step, micro, self.rank))
            last_micro = micro == tc.accumulate - 1
            with self._gradient_sync(last_micro):
                with autocast_context(self.precision, self.device):
                    outputs = self.forward(batch, progress_info)
                loss = outputs["loss"].float()
                self.scaler.scale(loss / tc.accumulate).backward()
            self._note_finite(outputs)
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    logs[key] = logs.get(key, 0.0) + value.detach().float() / tc.accumulate
        self.scaler.unscale_(self.optimizer)
        if tc.clip_grad_value:
            torch.nn.utils.clip_grad_value_(self.params, tc.clip_grad_value)
        if tc.clip_grad_norm:
            norm = fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, tc.clip_grad_norm))
            logs["grad_norm"] = norm
            if not self.scaler.is_enabled():  # with fp16 the scaler skips overflowing steps by design
                self._note_finite({"loss": logs["loss"]}, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step(progress_info)
        if self.ema:
            self._update_ema()
        logs["lr"] = torch.tensor(lr)
        return logs

    @torch.no_grad()
    def _preview(self, batch) -> None:
        """The first step of this run: a few augmented images of each view to the loggers (TensorBoard), drawn
        under a forked RNG so that training's random stream (and so its numbers) stays as without loggers."""
        self._previewed = True
        loggers = self.ctx.loggers
        if loggers is None or loggers.tensorboard.writer is None:
            return
        devices = [torch.cuda.current_device() if self.device.index is None else self.device.index] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            views = self.method.preview_views(batch)
        for name, images in views.items():
            loggers.log_images(f"{self.cfg.name}/views/{name}", images[:8], self.step)

    def _stop_at_boundary(self) -> None:
        """After SIGINT/SIGTERM: save a checkpoint at this step boundary and stop with a resume hint."""
        signal_number = self._stop_signal
        self._check_pending()
        self.save_checkpoint()
        raise TrainingInterrupted(
            f"stage {self.cfg.name!r} stopped by signal {signal_number} at step {self.step}/{self.total_steps}; "
            f"checkpoint saved to {self.checkpoint_path}. Continue with: ssl-kit run RECIPE --out "
            f"{self.ctx.run_dir} --resume", signal_number, self.ctx.run_dir)

    def fit(self) -> dict:
        """Train to total_steps (continuing from self.step), evaluate on the test split. -> final metrics.
        SIGINT/SIGTERM (Ctrl-C, a cluster's pre-emption) stop at the next step boundary with a checkpoint."""
        tc = self.cfg.train
        self.method.train()
        start_time, start_step = time.perf_counter(), self.step
        bar = progress(self.total_steps, f"{self.cfg.name}", tc.progress and self.is_main, initial=self.step)
        try:
            with catch_stop_signals(self):
                return self._fit_loop(tc, bar, start_time, start_step)
        finally:
            self._write_bad_images()
            self.loader.close()

    def _data_metrics(self) -> dict:
        """Streamed data: data/bad_images, the distinct bad files met so far by every rank (a collective under DDP:
        each rank sends the names it met since the last call, so bad_images.txt lists every rank's files)."""
        if self.bad_log is None:
            return {}
        self.bad_log.merge(dist.gather_objects(self.bad_log.unsent()))
        return {"data/bad_images": self.bad_log.total_count}

    def _write_bad_images(self) -> None:
        """bad_images.txt in the run dir: 'path<TAB>reason' per bad file met by the stream (also when a run stops
        because too many are bad)."""
        bad = self.bad_log
        lines = (bad.lines() if bad is not None else []) + [f"{n}\t{r}" for n, r in self.test_bad_files.items()]
        if not lines or not self.is_main:
            return
        path = self.ctx.run_dir / "bad_images.txt"
        known = set(path.read_text().splitlines()) if path.is_file() else set()
        with path.open("a") as handle:
            for line in lines:
                if line not in known:
                    handle.write(line + "\n")

    def _fit_loop(self, tc, bar, start_time: float, start_step: int) -> dict:
        try:
            while self.step < self.total_steps:
                logs = self._train_step()
                self._epoch_losses.append(logs["loss"])
                self.step += 1
                bar.update(1)
                last = self.step == self.total_steps
                if self.step % tc.log_every == 0 or last:
                    self._check_pending()
                    values = {**self._mean_over_ranks(logs), **self._data_metrics()}
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                    self._log({"kind": "step", **values})
                if self.step % self.steps_per_epoch == 0 or last:
                    self._end_epoch()
                if self.step % tc.checkpoint_every_steps == 0 or last:
                    self._check_pending()
                    self.save_checkpoint()
                if self.ctx.step_callback is not None:
                    self.ctx.step_callback(self.step)
                if self._stop_signal is not None and self.step < self.total_steps:
                    self._stop_at_boundary()
        finally:
            bar.close()
        elapsed = time.perf_counter() - start_time
        trained_steps = self.step - start_step
        if self.fsdp:  # from here on (final evaluation, backbone.pt, reports on rank 0) a plain module
            fsdp.release(self.method)
        result = self.evaluate()
        if trained_steps:
            per_step = tc.batch_size * (1 + (self.loader.mu if self.loader.unlabeled_stream else 0))
            result["images_per_s"] = trained_steps * per_step / elapsed
        return result

    def _end_epoch(self) -> None:
        epoch = (self.step - 1) // self.steps_per_epoch
        self._check_pending()
        mean_loss = float(dist.all_reduce_mean(torch.stack(self._epoch_losses).mean())) if self._epoch_losses \
            else float("nan")
        record = {"kind": "epoch", "epoch": epoch, "train/loss": mean_loss, **self._data_metrics()}
        record.update(self.method.epoch_metrics())
        self._epoch_losses = []
        every = self.cfg.train.eval_every_epochs
        if every and (epoch + 1) % every == 0 and self.step < self.total_steps:
            with fsdp.gathered(self.method) if self.fsdp else nullcontext():
                test = self.evaluate()
            record.update({f"test/{k}": v for k, v in test.items() if isinstance(v, float)})
        self.schedule.observe(record)
        self._log(record)

    def _mean_over_ranks(self, logs: dict) -> dict[str, float]:
        """0-d logs -> floats, averaged over ranks (each rank's loss is the mean over its share of the global batch,
        so their mean is the global batch's loss); one all-reduce per logged step."""
        keys = sorted(k for k in logs if k != "lr")
        values = dist.all_reduce_mean(torch.stack([logs[k].float().to(self.device) for k in keys]))
        out = {k: float(v) for k, v in zip(keys, values.tolist())}
        out["lr"] = float(logs["lr"])
        return {k: out[k] for k in logs}

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"stage": self.cfg.name, "step": self.step, **record}
        if self.ctx.metrics is not None:
            self.ctx.metrics.log(record)
        if self.ctx.loggers is not None:
            self.ctx.loggers.log({f"{self.cfg.name}/{k}": v for k, v in record.items() if k not in ("stage", "kind")},
                                 step=self.step)

    def evaluate(self) -> dict:
        """Test-split metrics of the method's classifier (the EMA one when enabled); {} without a head."""
        model = self.method.classifier(self.ema.module if self.ema else None)
        if model is None:
            return {}
        test = self.data.test
        if len(test) == 0:  # e.g. an unlabeled folder: nothing to score
            return {}
        return self._test_metrics(model, test)

    def _test_metrics(self, model: nn.Module, test: Images) -> dict:
        """Metrics of the held-out test split, scored in batches of 512 (its N × K logits are never held), in memory
        or decoded from files by workers with the evaluation transform. Unreadable files of a streamed split are
        left out of the metrics (never substituted: the score is over the images that could be read), each warned
        about once and listed in bad_images.txt; data.bad_images=error stops at the first one."""
        dc = self.cfg.data
        tally = ClassificationTally(test.num_classes)
        bad = BadImageLog(dc.bad_images, 1.0, max(1, len(test)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="skipping bad image")  # warned below: left out, not substituted
            for images, y in image_batches(test, dc.image_size, test.channels, 512, dc.workers,
                                           dc.eval_resize_ratio, bad):
                tally.add(predict(model, images, self.method.normalize, self.device), y)
        self._note_test_bad_files(bad.files, len(test))
        return tally.result() if tally.count else {}

    def _note_test_bad_files(self, files: dict[str, str], size: int) -> None:
        """Warn (main process, once per file) about bad files of the held-out test split; _write_bad_images lists
        them."""
        for name, reason in files.items():
            if name in self.test_bad_files:
                continue
            self.test_bad_files[name] = f"{reason} (held-out test split)"
            if self.is_main:
                warnings.warn(f"stage {self.cfg.name!r}: bad image {name} in the held-out test split: {reason}; "
                              f"left out of the test metrics ({size} test images)")
