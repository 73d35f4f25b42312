"""Run a recipe: each stage in order (stage orchestration), writing this run directory (its lifecycle: creation,
locking, resume checks, env.json: run_dir.py):

run_dir/
  config.yaml  metrics.jsonl  summary.json  report.md  plots/
  checkpoints/last.pt          the training checkpoint of the stage in progress
  stages/<stage>/backbone.pt   each training stage's result; backbone.pt = the latest one
  stages/<stage>/eval.json     per-class accuracy and confusion matrix
  splits/<stage>.json          labeled/unlabeled indices

Under torchrun only global rank 0 writes and reads the run dir; what other ranks need from it (the run dir's name,
the summary when resuming, earlier stages' backbones, evaluation results, the checkpoint to resume from) is
broadcast from rank 0, so nodes need not share a filesystem. After an elastic restart (torchrun --max-restarts,
TORCHELASTIC_RESTART_COUNT > 0) the run continues from checkpoints/last.pt without --resume.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from .common.metrics import minority_recall
from .config import EVAL_METHODS, Recipe, StageBase, validate_recipe
from .recipe_files import recipe_to_yaml
from .data.pipeline import DataInfo, prepare_data
from .data.kinds import dataset_kind
from .data.specs import parse_spec
from .engine import distributed as dist
from .engine.checkpoint import (atomic_save, atomic_write_text, backbone_record, build_from_record,
                                resolve_checkpoint, safe_load)
from .engine.loggers import JsonlLogger, Loggers, TensorBoardLogger, WandbLogger, truncate_metrics
from .engine.trainer import RunContext, Trainer, resolve_device
from .errors import CheckpointError, ConfigError, DataError, reword
from .eval.adaptation import adaptation_recipe, adaptation_scores
from .eval.report import write_report
from .eval.stages import run_eval_stage, stage_metrics
from .eval.vit_readout import PatchTokens, ViTReadout
from .methods import build_method
from .models.bounds import check_architecture
from .models.checkpointing import enable_grad_checkpointing
from .models.external import is_torchvision_reference
from .models.heads import Classifier
from .models.registry import build_backbone
from .run_dir import is_global_rank0, agree_on_run_dir, finite_or_none, log, write_env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _first_device(recipe: Recipe) -> str:
    """The train.device of the recipe's first training stage ('auto' when it has none)."""
    for stage in recipe.stages:
        if hasattr(stage, "train"):
            return stage.train.device
    return "auto"


class RecipeRunner:
    """Executes the stages of a recipe into run_dir. summary.json holds flat '<stage>/<metric>' keys."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False,
                 step_callback: Optional[Callable[[int], None]] = None) -> None:
        self.recipe, self.run_dir, self.resume = recipe, Path(run_dir), resume
        self.step_callback = step_callback
        self.summary: dict = {}
        self.backbones: dict[str, Path] = {}
        self.is_main = is_global_rank0()

    # ----------------------------------------------------------------------------------- helpers
    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    def _write_summary(self) -> None:
        if self.is_main:
            tmp = self.summary_path.parent / ".summary.json.tmp"
            tmp.write_text(json.dumps(finite_or_none(self.summary), indent=2, sort_keys=False))
            os.replace(tmp, self.summary_path)

    def _done_stages(self) -> list[str]:
        return list(self.summary.get("_completed_stages", []))

    def _truncate_metrics_for_resume(self) -> None:
        checkpoint = self.run_dir / "checkpoints" / "last.pt"
        stage, step = None, -1
        if checkpoint.is_file():
            state = safe_load(checkpoint, "resume checkpoint")
            stage, step = state.get("stage"), state.get("step", -1)
            if not isinstance(step, int) or isinstance(step, bool) or not isinstance(stage, str):
                raise CheckpointError(f"resume checkpoint {str(checkpoint)!r}: 'stage' and 'step' must be a name "
                                      f"and an integer, got {stage!r} and {step!r}")
        truncate_metrics(self.run_dir / "metrics.jsonl", self._done_stages(), stage, step)

    def _load_record(self, source: str, what: str = "checkpoint") -> dict:
        """The backbone record of an earlier stage (by name) or of a checkpoint path; `what` names the slot in
        errors. Rank 0 reads it and broadcasts it under torchrun, so it need only exist on rank 0's node (nodes may
        not share a filesystem)."""
        path = self.backbones.get(source, source)
        return dist.broadcast_object(resolve_checkpoint(path, what) if self.is_main else None)

    def _init_record(self, stage: StageBase) -> Optional[dict]:
        """The init backbone record (init.checkpoint or init.from_stage), None for a fresh backbone."""
        if stage.init.checkpoint:
            return self._load_record(stage.init.checkpoint, f"stages[{stage.name}].init.checkpoint")
        if stage.init.from_stage:
            return self._load_record(stage.init.from_stage, f"stages[{stage.name}].init.from_stage")
        return None

    def _build_backbone(self, stage: StageBase, info: DataInfo, record: Optional[dict]):
        """(backbone module, {arch, kwargs}) of a stage: fresh from backbone.name/kwargs, or from the init record;
        activation checkpointing on when backbone.grad_checkpointing asks."""
        backbone, arch = self._backbone_from(stage, info, record)
        if stage.backbone.grad_checkpointing:
            enable_grad_checkpointing(backbone, f"stages[{stage.name}].backbone.grad_checkpointing")
        return backbone, arch

    def _backbone_from(self, stage: StageBase, info: DataInfo, record: Optional[dict]):
        if record is None:
            try:
                check_architecture(stage.backbone.name, stage.backbone.kwargs, info.channels, info.image_size,
                                   f"stages[{stage.name}].backbone")
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
            return build_backbone(stage.backbone.name, info.channels, info.image_size, stage.backbone.kwargs), \
                {"arch": stage.backbone.name, "kwargs": dict(stage.backbone.kwargs)}
        if "name" in stage.backbone.model_fields_set and stage.backbone.name != record["arch"]:
            raise ConfigError(f"stages[{stage.name}].backbone.name is {stage.backbone.name!r} but the init checkpoint "
                              f"holds a {record['arch']!r}; drop backbone.name or use a matching checkpoint")
        trained = record["data"]
        if trained["channels"] != info.channels:
            raise ConfigError(f"stages[{stage.name}]: the init backbone was trained on {trained['channels']}-channel "
                              f"images, this stage's data has {info.channels}; set data.channels={trained['channels']}")
        kwargs = dict(record["kwargs"])
        if "kwargs" in stage.backbone.model_fields_set:  # e.g. drop_path / global_pool for fine-tuning
            kwargs.update(stage.backbone.kwargs)
        record = dict(record, kwargs=kwargs, data=dict(trained, image_size=info.image_size))
        return build_from_record(record), {"arch": record["arch"], "kwargs": kwargs}

    # ------------------------------------------------------------------------------------ stages
    def run(self) -> dict:
        run_dir = self.run_dir
        if self.is_main:
            atomic_write_text(run_dir / "config.yaml", recipe_to_yaml(self.recipe))
            write_env(run_dir)
        if self.is_main and self.resume and self.summary_path.is_file():
            self.summary = json.loads(self.summary_path.read_text())
        self.summary = dist.broadcast_object(self.summary)
        for name, path in self.summary.get("_backbones", {}).items():
            self.backbones[name] = Path(path)
        if self.resume and self.is_main:
            self._truncate_metrics_for_resume()
        metrics = JsonlLogger(run_dir / "metrics.jsonl") if self.is_main else None
        trackers = Loggers(WandbLogger(self.recipe.wandb, run_dir, self.recipe.model_dump(mode="json"), run_dir.name),
                           TensorBoardLogger(self.recipe.tensorboard, run_dir)) if self.is_main else None
        try:
            for stage in self.recipe.stages:
                if stage.name in self._done_stages():
                    log(f"[ssl-kit] stage {stage.name!r} already complete, skipping")
                    continue
                log(f"[ssl-kit] stage {stage.name!r} ({stage.method})")
                seed_everything(self.recipe.seed)
                if stage.method in EVAL_METHODS:
                    results = self._run_eval_stage(stage)
                else:
                    results = self._run_training_stage(stage, RunContext(run_dir, self.recipe.seed, trackers,
                                                                         metrics, self.step_callback))
                self.summary.update({f"{stage.name}/{k}": v for k, v in results.items()})
                self.summary.setdefault("_completed_stages", []).append(stage.name)
                self.summary["_backbones"] = {k: str(v) for k, v in self.backbones.items()}
                self._write_summary()
                if trackers is not None:
                    trackers.log({f"{stage.name}/{k}": v for k, v in results.items()})
            if self.is_main:
                write_report(run_dir, self.recipe, self.summary)
                trackers.log_figures(run_dir / "plots")
                if (run_dir / "backbone.pt").is_file():
                    trackers.log_artifact(run_dir / "backbone.pt", f"{run_dir.name}-backbone")
        finally:
            if metrics is not None:
                metrics.close()
            if trackers is not None:
                trackers.finish()
        return finite_or_none({k: v for k, v in self.summary.items() if not k.startswith("_")})

    def _run_training_stage(self, stage: StageBase, ctx: RunContext) -> dict:
        record = self._init_record(stage)
        data_cfg = stage.data
        if record is not None and data_cfg.channels is None:
            data_cfg = data_cfg.model_copy(update={"channels": record["data"]["channels"]})
        method_cls = build_method(stage.method)
        try:
            data = prepare_data(data_cfg, self.recipe.seed, method_cls.data_needs(stage))
        except DataError as exc:  # name the recipe key to change: stages[pretrain].data -> pretrain.data.root=DIR
            raise reword(exc, f"stages[{stage.name}].data: {exc}")
        self._save_split(stage.name, data)
        backbone, arch = self._build_backbone(stage, data.info, record)
        method = method_cls(stage, backbone, data.info, **method_cls.context_from(stage, data, self._load_record))
        meta = {**arch, "data": data.info.to_dict(), "backbone_prefix": method.backbone_prefix,
                "head_prefix": method.head_prefix}
        trainer = Trainer(method, data, stage, ctx, meta)
        if self.resume and trainer.try_resume():
            log(f"[ssl-kit] resumed stage {stage.name!r} at step {trainer.step}/{trainer.total_steps}")
        started = time.perf_counter()
        results = trainer.fit()
        results_flat = {f"test/{k}": v for k, v in results.items() if k in ("top1", "top5", "balanced_accuracy")}
        labeled_counts = _labeled_class_counts(data)
        results_flat.update(_minority_metrics(results, labeled_counts))
        if "images_per_s" in results:
            results_flat["images_per_s"] = round(results["images_per_s"], 1)
        results_flat["train_seconds"] = round(time.perf_counter() - started, 2)
        results_flat["steps"] = trainer.total_steps
        if self.is_main:
            evaluated = trainer.method.classifier(trainer.ema.module if trainer.ema else None)
            self._save_stage_outputs(stage, trainer, evaluated, results, meta, labeled_counts)
            if evaluated is not None:
                results_flat.update(trainer.method.final_report(evaluated, data, self.run_dir))
        else:
            self.backbones[stage.name] = self.run_dir / "stages" / stage.name / "backbone.pt"  # rank 0's path
        return dist.broadcast_object(results_flat)  # every rank reports rank 0's numbers

    def _save_split(self, name: str, data) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "splits" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "dataset": data.info.dataset, "labeled": data.labeled.tolist(),
            "unlabeled": None if data.unlabeled is None else data.unlabeled.tolist()}))

    def _save_stage_outputs(self, stage: StageBase, trainer: Trainer, evaluated, results: dict, meta: dict,
                            labeled_counts: torch.Tensor) -> None:
        """backbone.pt holds the network whose test metrics are reported: the evaluated classifier (the EMA copy
        when the method evaluates it), else the method's backbone and head."""
        stage_dir = self.run_dir / "stages" / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(evaluated, Classifier):
            backbone, head = evaluated.backbone, evaluated.head
        else:
            backbone, head = trainer.method.get_backbone(), trainer.method.head()
        record = backbone_record(meta["arch"], meta["kwargs"], meta["data"], backbone, head)
        atomic_save(record, stage_dir / "backbone.pt")
        shutil.copyfile(stage_dir / "backbone.pt", self.run_dir / ".backbone.pt.tmp")
        os.replace(self.run_dir / ".backbone.pt.tmp", self.run_dir / "backbone.pt")
        self.backbones[stage.name] = stage_dir / "backbone.pt"
        details = {k: v for k, v in results.items() if k in ("per_class", "confusion", "top1", "top5")}
        details["classes"] = trainer.data.info.classes
        details["labeled_counts"] = labeled_counts.tolist()
        (stage_dir / "eval.json").write_text(json.dumps(details))

    def _run_eval_stage(self, stage) -> dict:
        """Rank 0 evaluates (it holds the backbones) and broadcasts the results; other ranks wait."""
        results = self._evaluate(stage) if self.is_main else None
        return dist.broadcast_object(results)

    def _evaluate(self, stage) -> dict:
        trained_by = None  # the training stage of this recipe whose backbone is evaluated
        if stage.checkpoint:
            source = stage.checkpoint
        elif stage.from_stage:
            source, trained_by = self.backbones[stage.from_stage], stage.from_stage
        elif self.backbones:
            trained_by, source = list(self.backbones.items())[-1]
        else:
            raise ConfigError(f"stages[{stage.name}]: no backbone to evaluate: give checkpoint or from_stage, or put "
                              f"a training stage before it")
        dataset = stage.data
        if dataset is None and scores_a_dataset(stage):
            dataset = resolve_checkpoint(source, f"stages[{stage.name}].checkpoint")["data"].get("dataset")
            if not isinstance(dataset, str):
                raise ConfigError(f"stages[{stage.name}]: the checkpoint records no dataset; set data: SPEC")
        if stage.memory_budget_gb is None and trained_by:  # the data settings the backbone's stage trained with
            budget = self.recipe.stage(trained_by).data.memory_budget_gb
            stage = stage.model_copy(update={"memory_budget_gb": budget})
        try:
            return stage_metrics(stage, evaluate(stage, source, dataset, self.run_dir, self.recipe.seed))
        except DataError as exc:  # which stage's spec: its data, a transfer target or a domain (the text names it)
            raise reword(exc, f"stages[{stage.name}]: {exc}")


def _labeled_class_counts(data) -> torch.Tensor:
    """Labeled training images per class (K,) of a stage's split (unknown labels left out)."""
    labels = data.train.labels[data.labeled]
    return torch.bincount(labels[labels >= 0], minlength=data.info.num_classes)


def _minority_metrics(results: dict, labeled_counts: torch.Tensor) -> dict:
    """{"test/minority_recall": mean test recall of the classes with the fewest labeled training images} when the
    labeled split is imbalanced (data.long_tail, a long-tailed folder); {} otherwise."""
    if "per_class" not in results or int(labeled_counts.sum()) == 0:
        return {}
    recall = minority_recall(results["per_class"], labeled_counts)
    return {} if recall is None else {"test/minority_recall": recall}


def evaluate(stage, checkpoint, dataset: Optional[str], run_dir: Optional[Path], seed: int) -> dict:
    """One validated evaluation stage (linear_probe, attentive_probe, knn, transfer) on `checkpoint` -> its full
    result: what `ssl-kit run` does for an evaluation stage, and what `ssl-kit linear-probe / knn / ...` do with the
    one-stage recipe they build, so a command and a recipe stage cannot disagree.

    Transfer's FixMatch adaptation is training: its two stages (adaptation.adaptation_recipe) run first, as a
    recipe of their own under run_dir/stages/<name>/adapt-<target> (a temporary folder without run_dir), and the
    scoring reads their target test top-1. The evaluation code itself never trains."""
    adapted = None
    if stage.method == "transfer" and "fixmatch" in stage.adapt:
        adapted = {target: _adapt(stage, checkpoint, dataset, target, run_dir, seed) for target in stage.targets}
    return run_eval_stage(stage, checkpoint, dataset, run_dir, seed, adapted)


def _adapt(stage, checkpoint, source: str, target: str, run_dir: Optional[Path], seed: int) -> dict:
    """Train the FixMatch adaptation stages of `stage` to `target` -> their scores (adaptation_scores)."""
    if is_torchvision_reference(checkpoint):
        raise ConfigError(f"stages[{stage.name}]: fixmatch adaptation fine-tunes the backbone, so it needs an ssl_kit "
                          f"checkpoint (backbone.pt, run dir or training checkpoint), got {str(checkpoint)!r}")
    raw = adaptation_recipe(checkpoint, source, target, stage.adapt_steps, seed, stage.device)
    recipe = validate_recipe(raw, f"fixmatch adaptation to {target!r}")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target)
    out = run_dir / "stages" / stage.name / f"adapt-{safe}" if run_dir is not None else \
        Path(tempfile.mkdtemp(prefix="ssl-kit-adapt-"))
    _, summary = run_recipe(recipe, out)
    return adaptation_scores(summary)


def reads_vit_blocks(stage) -> bool:
    """Whether an evaluation stage reads a ViT's blocks: the attentive probe's patch tokens, n_last_blocks, avgpool."""
    return stage.method == "attentive_probe" or stage.n_last_blocks != 1 or stage.avgpool


def evaluations_after_training(recipe: Recipe) -> Iterator[tuple[Any, Optional[StageBase]]]:
    """Each evaluation stage that comes after a training stage, with the training stage whose backbone it reads
    (None when it reads its own `checkpoint`): what can be checked before anything trains."""
    last_trained = None
    for stage in recipe.stages:
        if stage.method not in EVAL_METHODS:
            last_trained = stage
        elif last_trained is not None:
            source = None if stage.checkpoint else \
                recipe.stage(stage.from_stage) if stage.from_stage else last_trained  # validated: a training stage
            yield stage, source


def scores_a_dataset(stage) -> bool:
    """Whether an evaluation stage scores the labeled images of one dataset (`data`, by default the backbone's):
    every one but a transfer stage that only runs leave-one-domain-out over its `domains`."""
    return stage.method != "transfer" or bool(stage.targets or stage.corruptions)


def check_readouts(recipe: Recipe) -> None:
    """An evaluation stage that reads a ViT's blocks (reads_vit_blocks) after a training stage is checked against the
    backbone it will read, built on the meta device (read_skeleton), before anything trains: a CNN, or more blocks
    than the ViT has, is refused at once instead of after the training."""
    for stage, source in evaluations_after_training(recipe):
        if not reads_vit_blocks(stage):
            continue
        skeleton = read_skeleton(stage, source)
        if skeleton is None:
            continue
        try:
            PatchTokens(skeleton) if stage.method == "attentive_probe" else \
                ViTReadout(skeleton, stage.n_last_blocks, stage.avgpool)
        except ConfigError as exc:
            raise reword(exc, f"stages[{stage.name}]: {exc}")


def read_skeleton(stage, source: Optional[StageBase]) -> Optional[torch.nn.Module]:
    """The backbone an evaluation stage will read, on the meta device, with its .arch: that of the training stage
    `source`, else that of its `checkpoint` (its record read now: a missing or broken file is refused here too).
    None for a torchvision:NAME checkpoint, whose network is built only when read."""
    if source is not None:
        arch, kwargs, channels, size = source.backbone.name, source.backbone.kwargs, source.data.channels or 3, \
            source.data.image_size
        where = f"stages[{source.name}].backbone"
    elif is_torchvision_reference(stage.checkpoint):
        return None
    else:
        record = resolve_checkpoint(stage.checkpoint, f"stages[{stage.name}].checkpoint")
        arch, kwargs, channels, size = record["arch"], record["kwargs"], record["data"]["channels"], \
            record["data"]["image_size"]
        where = f"stages[{stage.name}].checkpoint"
    skeleton = check_architecture(arch, kwargs, channels, size, where)
    skeleton.arch = arch
    return skeleton


def check_eval_labels(recipe: Recipe) -> None:
    """An evaluation stage without `data` scores the dataset its backbone trained on; when that is of a kind with no
    labels of its own (DatasetKind.unlabeled: images:ROOT) and has no labels CSV, it has nothing to fit or score, so
    it is refused before anything trains, asking for a labeled `data` (pretraining on unlabeled images is the usual
    case)."""
    for stage, source in evaluations_after_training(recipe):
        if source is None or stage.data is not None or not scores_a_dataset(stage):
            continue
        try:
            spec = parse_spec(source.data.spec())
        except DataError:
            continue  # the training stage refuses its own spec, naming its key
        if dataset_kind(spec.name).unlabeled and not spec.option("labels") and not source.data.labels:
            raise ConfigError(f"stages[{stage.name}]: scores labeled images of the dataset stage {source.name!r} "
                              f"trains on, {str(spec)!r}, an unlabeled image tree; give the stage data: SPEC with "
                              f"labels (e.g. imagefolder:ROOT, or images:ROOT,labels=labels.csv)")


def run_recipe(recipe: Recipe, out: Optional[Path] = None, resume: bool = False,
               step_callback: Optional[Callable[[int], None]] = None,
               allow_config_change: bool = False) -> tuple[Path, dict]:
    """Run every stage of `recipe` into `out` (a fresh dir under runs/ when None). -> (run_dir, summary).
    Under torchrun (WORLD_SIZE > 1) joins the process group first; every rank returns rank 0's summary. Rank 0
    holds the run directory's lock (engine/run_lock.py) for the whole run; on resume the recipe is first compared
    with the run's config.yaml (check_resume_config)."""
    check_readouts(recipe)
    check_eval_labels(recipe)
    if dist.launched_distributed():
        dist.init_from_env(str(resolve_device(_first_device(recipe))))
    run_dir, resume, lock = agree_on_run_dir(recipe, out, resume, allow_config_change)
    try:
        summary = RecipeRunner(recipe, run_dir, resume, step_callback).run()
    finally:
        if lock is not None:
            lock.release()
    return run_dir, summary
