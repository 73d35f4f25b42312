"""Recipe files: bounded YAML loading (alias bombs, depth and size refused before any object is built),
`key.sub=value` overrides, and the resolved recipe written back as YAML. The schema they are validated against:
config.py.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe, short_repr, validate_recipe
from .errors import ConfigError
from .limits import how_to_raise, limit


def parse_override(text: str) -> tuple[list[str], Any]:
    """'fixmatch.threshold=0.9' -> (['fixmatch', 'threshold'], 0.9). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, value_text = text.split("=", 1)
    path = key.strip().split(".")
    if not key.strip() or any(not part.strip() for part in path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = bounded_yaml(value_text, f"override {short_repr(text)}") if value_text.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: value is not valid YAML ({problem})") from None
    return [part.strip() for part in path], value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `key.sub=value` applied; a first part naming a stage addresses it."""
    result = copy.deepcopy(raw)
    stages = result.get("stages") if isinstance(result.get("stages"), list) else []
    stage_names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    for text in overrides:
        path, value = parse_override(text)
        if path[0] in stage_names and path[0] not in ("seed", "name", "wandb", "stages", "description"):
            target = result["stages"][stage_names.index(path[0])]
            rest = path[1:]
            if not rest:
                raise ConfigError(f"override {text!r} names stage {path[0]!r} but no key inside it")
        elif len(path) == 1 or path[0] in ("wandb",):
            target, rest = result, path
        else:
            raise ConfigError(
                f"override {text!r}: {path[0]!r} is neither a stage of this recipe (stages: {stage_names}) "
                f"nor a top-level key (seed, name, description, wandb)"
            )
        for part in rest[:-1]:
            node = target.get(part)
            if node is None:
                node = target[part] = {}
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} holds a {type(node).__name__}, not a mapping")
            target = node
        target[rest[-1]] = value
    return result


def _expanded_size(root: yaml.Node, source: str) -> tuple[int, int, int]:
    """(nodes, scalar characters, depth) of the document once every alias is expanded, computed on the composed
    node graph (aliases are shared nodes there, so this costs one visit per distinct node). Cyclic aliases raise."""
    done: dict[int, tuple[int, int, int]] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in done:
            continue
        if isinstance(node, yaml.ScalarNode):
            done[key] = (1, len(node.value), 1)
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            active.discard(key)
            sizes = [done[id(c)] for c in children]
            done[key] = (1 + sum(n for n, _, _ in sizes), sum(c for _, c, _ in sizes),
                         1 + max((d for _, _, d in sizes), default=0))
            continue
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to a node that contains it (a cyclic alias)")
        active.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in active:
                raise ConfigError(f"{source}: a YAML alias refers to a node that contains it (a cyclic alias)")
            if id(child) not in done:
                stack.append((child, False))
    return done[id(root)]


def bounded_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with bounds checked on the composed document before any Python object is built: nodes and
    scalar characters after alias expansion (the "billion laughs"), nesting depth, no cyclic aliases."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: YAML nested too deeply; {how_to_raise('MAX_YAML_DEPTH')}") from None
        if node is None:
            return None
        nodes, chars, depth = _expanded_size(node, source)
        for name, value, what in (("MAX_YAML_NODES", nodes, "values"), ("MAX_YAML_CHARS", chars, "characters"),
                                  ("MAX_YAML_DEPTH", depth, "levels of nesting")):
            if value > limit(name):
                raise ConfigError(f"{source}: the YAML expands to {value:,} {what} once its aliases (*name) are "
                                  f"expanded; {how_to_raise(name)}")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    """A recipe (or a run's config.yaml) as a dict: a regular UTF-8 file within MAX_RECIPE_BYTES, bounded YAML
    (bounded_yaml), a mapping at the top."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise ConfigError(f"recipe file {str(path)!r} is {kind}")
    size = path.stat().st_size
    if size > limit("MAX_RECIPE_BYTES"):
        raise ConfigError(f"recipe file {str(path)!r} is {size:,} bytes; {how_to_raise('MAX_RECIPE_BYTES')}")
    try:
        raw = bounded_yaml(path.read_text(encoding="utf-8"), f"recipe file {str(path)!r}")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {str(path)!r} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe file {str(path)!r}: a recipe is a mapping with 'seed' and 'stages', got a "
                          f"{type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides, validate. Raises ConfigError with key paths."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    recipe = validate_recipe(raw, source=f"recipe {str(path)!r}")
    if recipe.name is None:
        recipe.name = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(path).stem).lstrip("._-")[:128] or "run"
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
