"""`ssl-kit` command line: thin argument parsing over library functions. Progress and logs go to stderr; with
--json, stdout carries exactly one JSON object.

Start-up: this module imports the standard library, errors and _version only, and each command imports what it
needs (torch, the method registry, pydantic) when it runs, so `ssl-kit --help`, `--version` and `recipes` answer
without loading torch (tests/test_package.py checks sys.modules; benchmarks/startup.py times it).
"""
from __future__ import annotations

import argparse
import difflib
import errno
import importlib.resources
import json
import math
import os
import select
import shlex
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

from ._version import __version__
from .errors import SslKitError, TrainingInterrupted, UsageError, reword
from .limits import check_environment

# Commands import the heavy layers inside their functions ("# deferred: start-up" below): torch, timm, kornia and
# pydantic load only for a command that uses them.
LOCAL_RECIPE_DIR = Path("recipes")  # ./recipes of the working directory: the user's own recipes, found by name first
CHECKPOINT_HELP = ("backbone.pt, run directory, training checkpoint, torchvision:NAME / timm:NAME (with --weights), "
                   "or another repo's file: [mae|dino|dino-student|dinov2|mocov3|solo-learn|lightly|state-dict:]FILE "
                   "(.pth or .safetensors; the layout is detected unless given)")
ARCH_HELP = ("architecture of a file that does not record it: timm:NAME | torchvision:NAME | an ssl_kit backbone "
             "name, optionally with kwargs: timm:vit_small_patch16_224,global_pool=avg")


def _emit(result: dict, as_json: bool) -> None:
    from .run_dir import finite_or_none  # deferred: start-up (run_dir imports torch)

    result = finite_or_none(result)
    if as_json:
        print(json.dumps(result, default=float, allow_nan=False))
        return
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def bundled_recipe_dir() -> Path:
    """The recipes shipped inside the package (ssl_kit/recipes: package data of the wheel), wherever it is
    installed; read through importlib.resources, never relative to a source checkout."""
    folder = importlib.resources.files(__package__).joinpath("recipes")
    if not isinstance(folder, Path):  # a zip import: the recipes are not files on disk
        raise SslKitError(f"the bundled recipes are not on the file system ({folder}); install ssl_kit unzipped")
    return folder


def recipe_dirs() -> tuple[Path, ...]:
    """Where a recipe name is looked up, first hit wins: ./recipes of the working directory (the user's own, which
    may shadow a bundled one of the same name), then the bundled recipes."""
    return (LOCAL_RECIPE_DIR, bundled_recipe_dir())


def find_recipe(name: str) -> Path:
    """A path, or the name of a recipe in ./recipes or the bundled ones (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.exists():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise SslKitError(f"recipe {name!r} is {kind}; give a YAML file or a bundled recipe name")
    for folder in recipe_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                if folder == LOCAL_RECIPE_DIR and (bundled_recipe_dir() / candidate.name).is_file():
                    print(f"[ssl-kit] recipe {name!r}: using {candidate} (it shadows the bundled one)", file=sys.stderr)
                return candidate
    known = sorted({p.stem for p in (*local_recipes(), *bundled_recipes())})
    near = closest_names(Path(name).stem, known)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise SslKitError(f"recipe {name!r} not found in ./recipes or the bundled recipes; {hint}`ssl-kit recipes` "
                      f"lists all {len(known)}")


def closest_names(name: str, known: list[str], count: int = 5) -> list[str]:
    """Up to `count` of `known` that look like `name`: those containing it (or contained in it), then the closest
    by difflib's ratio, then those whose first word (before '_', the method) is close to name's, best first."""
    containing = [k for k in known if name and (name in k or k in name)]
    similar = difflib.get_close_matches(name, known, n=count, cutoff=0.6)
    first = name.split("_")[0]
    ratio = {k: difflib.SequenceMatcher(None, first, k.split("_")[0]).ratio() for k in known}
    same_method = sorted((k for k in known if ratio[k] >= 0.8), key=lambda k: -ratio[k])
    return list(dict.fromkeys(containing + similar + same_method))[:count]


def bundled_recipes() -> list[Path]:
    """The recipes shipped with the package, sorted by name."""
    folder = bundled_recipe_dir()
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def local_recipes() -> list[Path]:
    """The user's recipes in ./recipes of the working directory, sorted by name."""
    return sorted(LOCAL_RECIPE_DIR.glob("*.yaml")) if LOCAL_RECIPE_DIR.is_dir() else []


def cmd_run(args) -> int:
    if args.from_bundle:
        return cmd_run_from_bundle(args)
    if args.recipe is None:
        raise SslKitError("run needs a RECIPE (or --from-bundle ARCHIVE)")
    from .eval.report import format_headline, headline_rows  # deferred: start-up (torch)
    from .recipe_files import load_recipe  # deferred: start-up (pydantic, the method registry)
    from .runner import run_recipe  # deferred: start-up (torch)
    from .engine.distributed import leave_process_group  # deferred: start-up (torch)

    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    out = Path(args.out) if args.out else None
    try:
        run_dir, summary = run_recipe(recipe, out, resume=args.resume, allow_config_change=args.allow_config_change)
        leave_process_group()  # under torchrun: the run is over on every rank
    except TrainingInterrupted as exc:
        where = exc.run_dir or out
        command = shlex.join(["ssl-kit", "run", args.recipe, *args.overrides, "--out", str(where), "--resume"])
        raise TrainingInterrupted(f"{str(exc).split(' Continue with:')[0]} Continue with: {command}",
                                  exc.signal_number, where) from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank returns rank 0's summary; one prints it
        return 0
    table = format_headline(headline_rows(summary, recipe.stages))
    if args.json:
        print(table, file=sys.stderr)
        _emit({"run_dir": str(run_dir), **summary}, True)
    else:
        print(table)
    print(f"[ssl-kit] run finished: {run_dir}\n[ssl-kit] report: {run_dir / 'report.md'}  "
          f"(all metrics: {run_dir / 'summary.json'})", file=sys.stderr)
    return 0


def cmd_run_from_bundle(args) -> int:
    """Re-run a reproduction bundle's config and compare the summary and splits with the bundled ones."""
    if args.recipe is not None or args.resume:
        raise SslKitError("--from-bundle takes no RECIPE and no --resume (the bundle holds the resolved config)")
    from .bundle import compare_runs, extract_bundle  # deferred: start-up (only this command needs it)
    from .recipe_files import load_recipe  # deferred: start-up (pydantic, the method registry)
    from .runner import run_recipe  # deferred: start-up (torch)

    workdir = Path(tempfile.mkdtemp(prefix="ssl-kit-bundle-"))
    try:  # the extraction folder never outlives the command
        bundled = extract_bundle(args.from_bundle, workdir)  # capped and validated before the re-run
        recipe = load_recipe(bundled / "config.yaml", args.overrides)
        run_dir, summary = run_recipe(recipe, Path(args.out) if args.out else None)
        comparison = compare_runs(bundled, run_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for key, (old, new) in comparison["differences"].items():
        print(f"[ssl-kit] differs from the bundle: {key}: {old} -> {new}", file=sys.stderr)
    for key, (old, new) in comparison["environment"].items():
        print(f"[ssl-kit] environment differs from the bundle's env.json: {key}: {old} -> {new}", file=sys.stderr)
    verdict = "reproduces" if comparison["matches"] else "does NOT reproduce"
    print(f"[ssl-kit] re-run {verdict} the bundle ({comparison['compared']} metrics and splits compared, "
          f"{len(comparison['differences'])} differ, timings ignored): {run_dir}", file=sys.stderr)
    _emit({"run_dir": str(run_dir), "bundle_matches": comparison["matches"],
           "bundle_environment_differences": comparison["environment"], **summary}, args.json)
    return 0 if comparison["matches"] else 1


def cmd_export(args) -> int:
    """The backbone in timm / torchvision / safetensors layout, verified; --bundle adds the reproduction archive."""
    from .bundle import find_run_dir, run_context, write_bundle  # deferred: start-up (only this command needs it)
    from .engine.checkpoint import resolve_checkpoint  # deferred: start-up (torch)
    from .models.export import verified_summary, write_export  # deferred: start-up (torch, timm)

    record = resolve_checkpoint(args.checkpoint)
    run_dir = find_run_dir(args.checkpoint.rsplit("@", 1)[0])
    if args.bundle and run_dir is None:
        raise SslKitError(f"--bundle needs a run (a run directory or a backbone.pt inside one); "
                          f"{args.checkpoint!r} is not in a run directory")
    bundle = (lambda staging: write_bundle(run_dir, staging, staging / "bundle.tar.gz")) if args.bundle else None
    result = write_export(record, args.to, args.out, args.tolerance, run_context(run_dir) if run_dir else None,
                          overwrite=args.overwrite, extra=bundle)  # the bundle is part of the published set
    print(f"[ssl-kit] verified: {verified_summary(result)}", file=sys.stderr)
    if args.bundle:
        result["bundle"] = str(Path(result["out"]) / "bundle.tar.gz")
    _emit(result, args.json)
    return 0


def _apply_arch(args) -> None:
    """`--arch ARCH` and `timm:NAME --weights FILE` -> the 'FILE@ARCH' reference resolve_checkpoint reads."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is None:
        return
    if checkpoint.startswith("timm:"):
        if not getattr(args, "weights", None) or args.weights == "random":
            raise SslKitError(f"--checkpoint {checkpoint} needs --weights FILE, a local .pth or .safetensors state "
                              f"dict (nothing is downloaded)")
        args.checkpoint, args.weights = f"{args.weights}@{checkpoint}", None
    elif getattr(args, "arch", None):
        args.checkpoint = f"{checkpoint}@{args.arch}"


def _scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not k.startswith("_")}


def _eval_stage(args, method: str, data: Optional[str], **keys):
    """The one-stage recipe an evaluation command stands for -> its validated stage (what `ssl-kit run` would run
    for the same keys in a recipe)."""
    from .config import validate_recipe  # deferred: start-up (pydantic, the method registry)

    readouts = {key: getattr(args, key) for key in ("n_last_blocks", "avgpool") if hasattr(args, key)}
    stage = {"name": args.command.replace("-", "_"), "method": method, "checkpoint": args.checkpoint, "data": data,
             "device": args.device, "weights": args.weights, "image_size": args.image_size,
             "memory_budget_gb": _budget_gb(args), **readouts, **keys}
    recipe = validate_recipe({"seed": args.seed, "stages": [stage]}, f"ssl-kit {args.command}")
    return recipe.stages[0]


def _budget_gb(args) -> float:
    """--budget-gb, or the default memory budget (read when the command runs, so the parser is built without
    torch and pydantic)."""
    if args.budget_gb is not None:
        return args.budget_gb
    from .eval.features import DEFAULT_MEMORY_BUDGET_GB  # deferred: start-up (torch, pydantic)

    return DEFAULT_MEMORY_BUDGET_GB


def _evaluate(args, stage) -> dict:
    from .runner import evaluate  # deferred: start-up (torch)

    return evaluate(stage, stage.checkpoint, stage.data, None, args.seed)


def cmd_linear_probe(args) -> int:
    stage = _eval_stage(args, "linear_probe", args.data, labels_per_class=args.labels_per_class, epochs=args.epochs,
                        sweep=not args.no_sweep, augment=args.augment)
    _emit(_scalars(_evaluate(args, stage)), args.json)
    return 0


def cmd_attentive_probe(args) -> int:
    stage = _eval_stage(args, "attentive_probe", args.data, labels_per_class=args.labels_per_class,
                        epochs=args.epochs, batch_size=args.batch_size, sweep=not args.no_sweep)
    _emit(_scalars(_evaluate(args, stage)), args.json)
    return 0


def cmd_knn(args) -> int:
    stage = _eval_stage(args, "knn", args.data, k=args.k, knn_temperature=args.temperature, ivf=args.ivf)
    _emit(_scalars(_evaluate(args, stage)), args.json)
    return 0


def cmd_transfer(args) -> int:
    if not (args.source or args.domains):
        raise SslKitError("transfer needs --source (with --target and/or --corruptions) or --domains "
                          "(leave-one-domain-out)")
    if args.source and not (args.target or args.corruptions):
        raise SslKitError("transfer --source needs at least one --target or --corruptions")
    from .eval.corruptions import parse_corruptions  # deferred: start-up (only this command needs it)
    from .eval.transfer import lodo_rows  # deferred: start-up (torch)

    corruptions = parse_corruptions(args.corruptions) if args.corruptions else []
    stage = _eval_stage(args, "transfer", args.source, targets=args.target or [], corruptions=corruptions,
                        severities=args.severities, adapt=args.adapt or [], adapt_steps=args.adapt_steps,
                        domains=args.domains or [], epochs=args.epochs, sweep=not args.no_sweep, tsne=False)
    result = _evaluate(args, stage)
    if args.json:
        _emit(result, True)
        return 0
    if "source" in result:
        print(f"source {args.source}: top1 {result['source']['top1']:.4f}")
        for target, metrics in result["targets"].items():
            extra = "".join(f"  {k} {v:.4f}" for k, v in metrics.items() if k.endswith("_top1"))
            print(f"target {target}: top1 {metrics['top1']:.4f} (gap {metrics['gap']:+.4f}){extra}")
    if "leave_one_domain_out" in result:
        for domain, row in lodo_rows(result["leave_one_domain_out"]):
            print(f"held out {domain}: top1 {row['top1']:.4f}  oracle {row['oracle_top1']:.4f}")
    return 0


# `ssl-kit finetune`'s defaults by backbone family; each flag overrides its entry.
# CNN: SimCLR's fine-tuning (Chen et al. 2020, appendix B.5: Nesterov SGD, lr 0.05 × batch/256, every layer at that
# rate, no weight decay). ViT: MAE's and BEiT's (AdamW, weight decay 0.05, layer-wise lr decay 0.65 for ViT-B,
# betas 0.9 / 0.999) at lr 1e-3 unscaled, the value of the mae_digits recipe's finetune stage: MAE scales its base lr
# by batch/256, which at batch 64 leaves a few hundred steps too small a rate to move. SGD at the CNN's rate does not
# fine-tune a ViT, and a CNN's backbone at 0.1× its head's rate (the command's CNN default before) fine-tuned less:
# docs/benchmarks.md ("Fine-tuning on digits").
FINETUNE_PROTOCOLS = {
    "cnn": {"optimizer": {"name": "sgd", "lr": 0.05, "lr_scaling": "linear", "nesterov": True,
                          "backbone_lr_scale": 1.0, "weight_decay": 0.0},
            "layer_decay": None},
    "vit": {"optimizer": {"name": "adamw", "lr": 1e-3, "lr_scaling": "none", "backbone_lr_scale": 1.0,
                          "weight_decay": 0.05, "betas": [0.9, 0.999]},
            "layer_decay": 0.65},
}


def finetune_protocol(args, vit: bool) -> tuple[dict, Optional[float]]:
    """The optimizer section and layer decay of `ssl-kit finetune`: FINETUNE_PROTOCOLS[vit or cnn], then each flag
    the user gave (--optimizer switches to that optimizer's family defaults before --lr etc. apply)."""
    family = "vit" if vit else "cnn"
    if args.optimizer is not None:
        family = "vit" if args.optimizer == "adamw" else "cnn"
    protocol = FINETUNE_PROTOCOLS[family]
    optimizer = dict(protocol["optimizer"])
    for key in ("lr", "backbone_lr_scale", "weight_decay"):  # each flag's dest is the optimizer key it sets
        if getattr(args, key) is not None:
            optimizer[key] = getattr(args, key)
    layer_decay = args.layer_decay if args.layer_decay is not None else protocol["layer_decay"]
    return optimizer, layer_decay if vit else None


def describe_finetune(optimizer: dict, layer_decay: Optional[float], vit: bool) -> str:
    """One line naming what `ssl-kit finetune` will train with, for stderr."""
    scaling = " × batch/256" if optimizer["lr_scaling"] == "linear" else ""
    decay = f", layer decay {layer_decay:g}" if layer_decay else ""
    return (f"[ssl-kit] finetune: {'ViT' if vit else 'CNN'} backbone: {optimizer['name']} lr {optimizer['lr']:g}"
            f"{scaling}, backbone lr × {optimizer['backbone_lr_scale']:g}{decay}, weight decay "
            f"{optimizer['weight_decay']:g} (--optimizer, --lr, --backbone-lr-scale, --layer-decay, --weight-decay)")


def cmd_finetune(args) -> int:
    from .config import validate_recipe  # deferred: start-up (pydantic, the method registry)
    from .engine.checkpoint import resolve_checkpoint  # deferred: start-up (torch)
    from .models.bounds import check_architecture  # deferred: start-up (torch)
    from .models.external import is_torchvision_reference  # deferred: start-up (only this command needs it)
    from .models.vit import VisionTransformer  # deferred: start-up (torch)
    from .runner import run_recipe  # deferred: start-up (torch)

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"finetune --out {args.out!r} is a file, not a directory")
    if is_torchvision_reference(args.checkpoint):
        raise SslKitError("finetune takes an ssl_kit checkpoint (backbone.pt, run dir or training checkpoint); "
                          "torchvision:NAME backbones are for linear-probe, knn and transfer")
    record = resolve_checkpoint(args.checkpoint, "--checkpoint")
    info = record["data"]
    skeleton = check_architecture(record["arch"], record["kwargs"], info["channels"], info["image_size"],
                                  "--checkpoint")  # built without weights (on the meta device when large)
    vit = isinstance(skeleton, VisionTransformer)
    if args.layer_decay is not None and not vit:
        raise UsageError(f"--layer-decay decays a ViT's learning rates block by block; {args.checkpoint!r} is a "
                         f"{record['arch']} ({type(skeleton).__name__}), not a ViT")
    optimizer, layer_decay = finetune_protocol(args, vit)
    print(describe_finetune(optimizer, layer_decay, vit), file=sys.stderr)
    stage = {"name": "finetune", "method": "supervised", "init": {"checkpoint": args.checkpoint},
             "label_smoothing": args.label_smoothing, "layer_decay": layer_decay,
             "data": {"dataset": args.data, "labels_per_class": args.labels_per_class,
                      "image_size": args.image_size or info["image_size"]},
             "optimizer": optimizer,
             "schedule": {"name": "cosine", "warmup_epochs": min(1.0, args.epochs * 0.1)},
             "train": {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device}}
    recipe = validate_recipe({"seed": args.seed, "name": "finetune", "stages": [stage]}, "finetune arguments")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ssl-kit-finetune-"))
    try:
        run_dir, summary = run_recipe(recipe, out)
    except SslKitError as exc:  # the stage was built from flags: name the flag, not the recipe key
        raise reword(exc, str(exc).replace("train.batch_size", "--batch-size"))
    result = {k.split("/", 2)[-1]: v for k, v in summary.items() if k.startswith("finetune/test/")}
    result["run_dir"] = str(run_dir)
    _emit(result, args.json)
    return 0


def cmd_recipes(args) -> int:
    """The bundled recipes, then the user's ./recipes (marked; one of the same name shadows the bundled one)."""
    import yaml  # deferred: start-up (only this command reads YAML without validating it)

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 49 recipes in ~0.05 s instead of ~0.4 s
    local = local_recipes()
    shadowed = {path.stem for path in local}
    rows = [(path, "(shadowed by ./recipes)" if path.stem in shadowed else "") for path in bundled_recipes()]
    rows += [(path, f"({path})") for path in local]
    for path, where in rows:
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            raw = {"description": "(unreadable YAML)"}
        if not isinstance(raw, dict):
            raw = {"description": "(not a recipe: no mapping at the top)"}
        description = str(raw.get("description", "") or "")
        stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
        methods = " → ".join(str(s.get("method")) for s in stages if isinstance(s, dict))
        text = " ".join(filter(None, [description.splitlines()[0] if description else "", where]))
        print(f"{path.stem:32s} {methods:44s} {text}")
    return 0


def cmd_methods(args) -> int:
    """The registered training methods (one file each under ssl_kit/methods/) and the evaluation stages; with a
    name, that method's own keys and the optimizer/schedule settings it trains with when the recipe is silent."""
    if args.name:
        return _describe_method(args.name, args.json)
    from .config import EVAL_STAGES  # deferred: start-up (pydantic)
    from .methods import registered_methods  # deferred: start-up (torch, every method)

    rows = {name: _first_line(cls.__doc__ or cls.config_class.__doc__)  # by name, then the evaluation stages
            for name, cls in sorted(registered_methods().items())}
    rows.update({name: _first_line(schema.__doc__) + " (evaluation)" for name, schema in EVAL_STAGES.items()})
    if args.json:
        _emit({"methods": rows}, True)
        return 0
    for name, text in rows.items():
        print(f"{name:16s} {text}")
    return 0


def _describe_method(name: str, as_json: bool) -> int:
    """Print method `name`: summary, its own keys with defaults, and its recommended settings with their source."""
    from .methods import build_method, method_options  # deferred: start-up (torch, every method)

    config = build_method(name).config_class
    described = {"method": name, "summary": _first_line(build_method(name).__doc__ or config.__doc__),
                 "options": method_options(name), "recommended": config.recommended,
                 "recommended_source": config.recommended_source}
    if as_json:
        print(json.dumps(described, default=str))
        return 0
    print(f"{name}: {described['summary']}\n\noptions (stage keys; default, description):")
    for row in described["options"]:
        print(f"  {row['key']:26s} {row['default']!s:18s} {row['description']}")
    print("\nrecommended (filled in wherever the recipe is silent; keys the recipe gives win):")
    for section, keys in config.recommended.items():
        print(f"  {section}: " + ", ".join(f"{key}={value}" for key, value in keys.items()))
    print(f"  source: {config.recommended_source}")
    return 0


def _first_line(text) -> str:
    """The first sentence of a docstring, on one line."""
    words = " ".join((text or "").split())
    return words.split(". ")[0].rstrip(".")


def cmd_info(args) -> int:
    from .engine.checkpoint import resolve_checkpoint  # deferred: start-up (torch)
    from .eval.model_info import model_info  # deferred: start-up (torch)

    _emit(model_info(resolve_checkpoint(args.checkpoint, "--checkpoint")), args.json)
    return 0


def cmd_compare(args) -> int:
    from .eval.compare import compare_runs, format_table  # deferred: start-up (matplotlib, only when comparing)

    out = None if args.no_plot else Path(args.plot or Path(args.runs[0]).parent / "compare.png")
    table = compare_runs(args.runs, out)
    if args.json:
        print(json.dumps(table, allow_nan=False))
        return 0
    print(format_table(table))
    if table["plot"]:
        print(f"[ssl-kit] curves and accuracies: {table['plot']}", file=sys.stderr)
    return 0


def cmd_data(args) -> int:
    from .data.inspect import summarize  # deferred: start-up (only this command needs it)
    from .data.opened import is_streamed_source  # deferred: start-up (torch)
    from .data.sources import apply_labels_csv, build_index  # deferred: start-up (only this command needs it)
    from .data.specs import load_splits, parse_spec  # deferred: start-up (only this command needs it)
    from .data.stream import check_index  # deferred: start-up (only this command needs it)

    spec = parse_spec(args.spec)
    if not is_streamed_source(spec):
        splits = load_splits(spec)
        result = {"source": str(spec), "storage": "memory",
                  **{f"{name}_images": len(split) for name, split in splits.items()},
                  "classes": splits["train"].num_classes}
        _emit(result, args.json)
        return 0
    index = build_index(spec.name, spec.arg, workers=args.workers * 4)
    if args.labels:
        index = apply_labels_csv(index, args.labels)
    result = summarize(index, args.image_size, args.channels, args.storage, _budget_gb(args))
    if args.check:
        reads, bad = check_index(index, workers=args.workers)
        result.update(checked=reads, unreadable=len(bad), unreadable_files=[f"{p}: {r}" for p, r in bad])
    if args.json:
        _emit(result, True)
        return 0
    for key, value in result.items():
        if key == "unreadable_files":
            for line in value:
                print(f"unreadable: {line}")
        elif isinstance(value, dict):
            print(f"{key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()))
        else:
            print(f"{key}: {value}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 2, and a JSON error under --json) instead of exiting itself."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that `key=value` overrides may follow an option: `ssl-kit run RECIPE --out DIR seed=7`
    means what `ssl-kit run RECIPE seed=7 --out DIR` does (plain argparse stops collecting positionals at the first
    option and refuses the rest). Anything else left over is refused by name, as parse_args does."""
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-")
                                                                               for e in extras):
        args.overrides = [*args.overrides, *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def bounded(kind, low: float, high: float, low_open: bool = False):
    """argparse type: a finite int/float in [low, high] (or (low, high] with low_open), naming the bounds."""
    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < low or value > high or low_open and value == low:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{text} is outside {bracket}{low:g}, {high:g}]")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE = bounded(int, 1, 10**6)
EPOCHS = bounded(int, 1, 100_000)
IMAGE_SIZE = bounded(int, 4, 1024)
SEED = bounded(int, 0, 2**63 - 1)
BUDGET_GB = bounded(float, 0, 1e6, low_open=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ssl-kit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"ssl-kit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stages of a recipe")
    run.add_argument("recipe", nargs="?", help="recipe YAML path or bundled recipe name")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. seed=7 fixmatch.threshold=0.9")
    run.add_argument("--out", help="run directory (default: runs/<recipe>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--allow-config-change", action="store_true",
                     help="with --resume: continue although the recipe differs from the run's config.yaml in "
                          "settings that change what is trained (recorded in resume_changes.jsonl)")
    run.add_argument("--json", action="store_true")
    run.add_argument("--from-bundle", metavar="ARCHIVE",
                     help="re-run a reproduction bundle (ssl-kit export --bundle) and compare with its summary")
    run.set_defaults(func=cmd_run)

    methods = sub.add_parser("methods", help="the training methods recipes can name (from the method registry)")
    methods.add_argument("name", nargs="?", help="show this method's options and recommended settings")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(func=cmd_methods)

    def evaluation(name: str, help_text: str, func, data_arg: bool = True):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
        p.add_argument("--arch", help=ARCH_HELP)
        if data_arg:
            p.add_argument("--data", required=True, help="dataset spec, e.g. digits, fashion-mnist, cifar10:/data")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        if func is not cmd_finetune:
            p.add_argument("--weights", help="local weights file for --checkpoint torchvision:NAME / timm:NAME "
                                             "('random': an untrained torchvision network)")
            p.add_argument("--image-size", type=IMAGE_SIZE, help="resize images to this size (default: the backbone's)")
            p.add_argument("--budget-gb", type=BUDGET_GB,
                           help="data.memory_budget_gb (default: the recipe default): a streamed source decoding to "
                                "more is embedded from files in workers, its features cached on disk")
        if func not in (cmd_finetune, cmd_attentive_probe):
            p.add_argument("--n-last-blocks", type=bounded(int, 1, 64), default=1,
                           help="ViT: concatenate the [cls] tokens of the last N blocks (DINOv2's linear "
                                "evaluation: 1 or 4)")
            p.add_argument("--avgpool", action="store_true",
                           help="ViT: append the mean of the last block's patch tokens (DINOv2's linear evaluation)")
        p.add_argument("--seed", type=SEED, default=0)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(func=func)
        return p

    probe = evaluation("linear-probe", "frozen features + linear classifier", cmd_linear_probe)
    probe.add_argument("--labels-per-class", type=POSITIVE)
    probe.add_argument("--epochs", type=EPOCHS, default=100)
    probe.add_argument("--no-sweep", action="store_true", help="skip the lr/wd sweep on the validation split")
    probe.add_argument("--augment", action="store_true",
                       help="re-extract features of randomly resized crops every epoch (ImageNet protocol; slower)")

    attentive = evaluation("attentive-probe", "frozen ViT patch tokens + attentive pooling + linear classifier "
                                              "(CAPI's attentive probe)", cmd_attentive_probe)
    attentive.add_argument("--labels-per-class", type=POSITIVE)
    attentive.add_argument("--epochs", type=EPOCHS, default=100)
    attentive.add_argument("--batch-size", type=bounded(int, 1, 65_536), default=128)
    attentive.add_argument("--no-sweep", action="store_true", help="skip the lr/wd sweep on the validation split")

    knn = evaluation("knn", "weighted kNN on frozen features (faiss)", cmd_knn)
    knn.add_argument("--k", type=bounded(int, 1, 10_000), default=20)
    knn.add_argument("--temperature", type=bounded(float, 0, 100, low_open=True), default=0.07)
    knn.add_argument("--ivf", action="store_true", help="approximate IVF index for large banks")

    finetune = evaluation("finetune", "fine-tune the whole backbone with a new head", cmd_finetune)
    finetune.add_argument("--labels-per-class", type=POSITIVE)
    finetune.add_argument("--epochs", type=bounded(float, 0, 100_000, low_open=True), default=20)
    finetune.add_argument("--optimizer", choices=["sgd", "adamw"],
                          help="default: adamw for a ViT (MAE/BEiT fine-tuning), sgd for a CNN (SimCLR's)")
    finetune.add_argument("--lr", type=bounded(float, 0, 100, low_open=True),
                          help="the head's lr (default: 1e-3 with adamw; 0.05 × batch/256 with sgd)")
    finetune.add_argument("--backbone-lr-scale", type=bounded(float, 0, 100),
                          help="the backbone's lr relative to the head's (default 1)")
    finetune.add_argument("--weight-decay", type=bounded(float, 0, 10),
                          help="default: 0.05 with adamw, 0 with sgd")
    finetune.add_argument("--batch-size", type=bounded(int, 1, 65_536), default=64)
    finetune.add_argument("--image-size", type=IMAGE_SIZE)
    finetune.add_argument("--layer-decay", type=bounded(float, 0, 1, low_open=True),
                          help="ViT layer-wise lr decay (default 0.65, MAE's for ViT-B; 1 = off)")
    finetune.add_argument("--label-smoothing", type=bounded(float, 0, 0.999), default=0.0)
    finetune.add_argument("--out")

    transfer = evaluation("transfer", "fit on a source domain, report accuracy on targets", cmd_transfer,
                          data_arg=False)
    transfer.add_argument("--source", help="dataset spec the probe is fitted on")
    transfer.add_argument("--target", action="append", help="dataset spec with the source's classes (repeatable)")
    transfer.add_argument("--corruptions",
                          help="'all' or a comma list (gaussian_noise, ..., jpeg) applied to the source test split")
    transfer.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5])
    transfer.add_argument("--adapt", action="append", choices=["adabn", "fixmatch"],
                          help="adaptation numbers beside the plain ones (repeatable)")
    transfer.add_argument("--adapt-steps", type=bounded(int, 1, 10**7), default=300, help="training steps of --adapt fixmatch")
    transfer.add_argument("--domains", nargs="+", help="leave-one-domain-out over these dataset specs (>= 3)")
    transfer.add_argument("--epochs", type=EPOCHS, default=100)
    transfer.add_argument("--no-sweep", action="store_true")

    export = sub.add_parser("export", help="the backbone in timm / torchvision / safetensors layout or as ONNX, "
                                           "verified")
    export.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    export.add_argument("--arch", help=ARCH_HELP)
    export.add_argument("--to", required=True, choices=["torchvision", "timm", "safetensors", "onnx"],
                        help="onnx: model.onnx (opset 18, dynamic batch), checked with onnxruntime; needs "
                             "pip install 'ssl_kit[onnx]'")
    export.add_argument("--out", required=True,
                        help="folder for model.safetensors (onnx: model.onnx), config.json, README.md")
    export.add_argument("--tolerance", type=float, default=None,
                        help="refuse when the exported model's outputs differ from ours by more: max abs, default "
                             "1e-5; --to onnx: relative to the largest feature, default 1e-4")
    export.add_argument("--bundle", action="store_true",
                        help="also write OUT/bundle.tar.gz: the run's config, env, metrics, report, splits + export")
    export.add_argument("--overwrite", action="store_true",
                        help="OUT may be a non-empty folder: replace the export's own files there as one set "
                             "(model.*, config.json, README.md, bundle.tar.gz), keep the others")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=cmd_export)

    recipes = sub.add_parser("recipes", help="list the bundled recipes (and your own in ./recipes)")
    recipes.set_defaults(func=cmd_recipes)

    data = sub.add_parser("data", help="what a dataset spec holds, whether it streams, unreadable files")
    data.add_argument("spec", help="dataset spec, e.g. imagefolder:/data/x, images:/data/x, filelist:list.csv, "
                                   "webdataset:/data/shards-{000000..000127}.tar")
    data.add_argument("--check", action="store_true", help="decode every image with workers and list unreadable ones")
    data.add_argument("--labels", help="CSV of path,label rows labelling a subset (data.labels)")
    data.add_argument("--image-size", type=int, default=224, help="size for the in-memory byte count")
    data.add_argument("--channels", type=int, default=3, choices=[1, 3])
    data.add_argument("--storage", default="auto", choices=["auto", "memory", "stream"])
    data.add_argument("--budget-gb", type=BUDGET_GB,
                      help="data.memory_budget_gb for storage auto (default: the recipe default)")
    data.add_argument("--workers", type=int, default=2)
    data.add_argument("--json", action="store_true")
    data.set_defaults(func=cmd_data)

    compare = sub.add_parser("compare", help="several runs' final metrics side by side, and one PNG of their "
                                             "training curves and accuracies")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/NAME-DATE-TIME)")
    compare.add_argument("--plot", help="where the PNG goes (default: compare.png beside the first run)")
    compare.add_argument("--no-plot", action="store_true", help="the table only")
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(func=cmd_compare)
    info = sub.add_parser("info", help="architecture, parameters and FLOPs of a checkpoint's backbone")
    info.add_argument("--checkpoint", required=True)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    return parser


WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the filesystem is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EDQUOT: "the disk quota is exceeded", errno.ENOTDIR: "a path component is a file",
                errno.EISDIR: "it is a directory", errno.ENAMETOOLONG: "the name is too long",
                errno.EFBIG: "the file size limit is reached"}


def _fail(kind: str, message: str, as_json: bool, code: int, prefix: str = "error: ") -> int:
    """Report an error: 'ssl-kit: error: ...' on stderr; with --json also {"error": {type, message}} on stdout."""
    print(f"ssl-kit: {prefix}{message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": message}}))
    return code


def _stdout_is_a_closed_pipe() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end), so that a
    broken pipe elsewhere (a data-loader worker's) is still reported as the bug it is."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this platform, or no real stdout
        return False


def console_main(argv: list[str] | None = None) -> None:
    """The `ssl-kit` executable: `main`, then exit with its status. A torchrun worker ends through
    `engine.distributed.end_worker` (its exit handlers run, the interpreter's teardown does not)."""
    status = main(argv)
    if "torch.distributed" in sys.modules:  # only a command that ran under torch can be a torchrun worker
        from .engine.distributed import end_worker, launched_distributed  # deferred: start-up (torch)

        if launched_distributed():
            end_worker(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input or environment (a clear message, no traceback), 128 + N stopped by signal N,
    130 Ctrl-C outside training, 1 an internal error (a bug: traceback on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    try:
        args = parse_command_line(build_parser(), argv)
        check_environment()  # every SSL_KIT_* knob parsed once, before any work (limits.py)
        _apply_arch(args)
        return args.func(args)
    except TrainingInterrupted as exc:
        return _fail(type(exc).__name__, str(exc), as_json, 128 + exc.signal_number, prefix="")
    except SslKitError as exc:
        return _fail(type(exc).__name__, str(exc), as_json, 2)
    except KeyboardInterrupt:
        return _fail("KeyboardInterrupt", "interrupted", as_json, 130, prefix="")
    except BrokenPipeError:
        if not _stdout_is_a_closed_pipe():
            raise
        # `ssl-kit methods | head`: the reader has gone, so stop quietly as a shell tool does (exit 128 + SIGPIPE);
        # stdout goes to /dev/null so that Python's own flush at exit does not fail a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        where = f" {str(exc.filename)!r}" if exc.filename else ""
        return _fail("OSError", f"cannot write{where}: {WRITE_ERRORS[exc.errno]} ({exc.strerror})", as_json, 2)
    except Exception as exc:  # a bug: keep the traceback for the report, and the JSON promise
        traceback.print_exc()
        return _fail(type(exc).__name__, f"internal error: {exc}", as_json, 1)


if __name__ == "__main__":
    console_main()
