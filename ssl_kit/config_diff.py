"""Differences between two resolved recipes, for an honest --resume.

A resumed run must train what the original run trained. `recipe_differences` lists every differing key path
(stages addressed by name, e.g. ``stages[pretrain].train.batch_size``); `is_harmless` says which of them only change
how a run is observed (logging, progress, checkpoint cadence, device, description) and so may change on a resume.
"""
from __future__ import annotations

import fnmatch
from typing import Any

HARMLESS = (
    "description", "name", "wandb", "wandb.*",
    "stages[*].train.progress", "stages[*].train.log_every", "stages[*].train.checkpoint_every_steps",
    "stages[*].train.keep_last", "stages[*].train.device", "stages[*].device", "stages[*].tsne",
)
MISSING = "<absent>"


def _stages_by_name(stages: Any) -> dict:
    if not isinstance(stages, list):
        return {}
    return {str(s.get("name", i)) if isinstance(s, dict) else str(i): s for i, s in enumerate(stages)}


def recipe_differences(old: Any, new: Any, path: str = "") -> list[dict]:
    """[{"key": "stages[fixmatch].mu", "old": 7, "new": 3}, ...] for every leaf that differs; an added or removed
    key or stage has MISSING on the other side. Stage order changes show as `stages.order`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key == "stages" and not path:
                out += _stage_differences(old.get(key), new.get(key))
            elif key not in new:
                out.append({"key": sub, "old": old[key], "new": MISSING})
            elif key not in old:
                out.append({"key": sub, "old": MISSING, "new": new[key]})
            else:
                out += recipe_differences(old[key], new[key], sub)
        return out
    if old != new or type(old) is not type(new) and not (isinstance(old, (int, float)) and isinstance(new, (int, float))):
        return [{"key": path or "<recipe>", "old": old, "new": new}]
    return []


def _stage_differences(old: Any, new: Any) -> list[dict]:
    old_stages, new_stages = _stages_by_name(old), _stages_by_name(new)
    out = []
    for name in list(old_stages) + [n for n in new_stages if n not in old_stages]:
        key = f"stages[{name}]"
        if name not in new_stages:
            out.append({"key": key, "old": "stage", "new": MISSING})
        elif name not in old_stages:
            out.append({"key": key, "old": MISSING, "new": "stage"})
        else:
            out += recipe_differences(old_stages[name], new_stages[name], key)
    common_old = [n for n in old_stages if n in new_stages]
    common_new = [n for n in new_stages if n in old_stages]
    if common_old != common_new:
        out.append({"key": "stages.order", "old": common_old, "new": common_new})
    return out


def is_harmless(key: str) -> bool:
    """True for keys that do not change what is trained or evaluated (see HARMLESS)."""
    return any(fnmatch.fnmatchcase(key, pattern.replace("[*]", "[[]*[]]")) for pattern in HARMLESS)


def format_differences(changes: list[dict], limit: int = 20) -> str:
    """One '  key: old -> new' line per change (values shortened), at most `limit` lines."""
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    lines = [f"  {c['key']}: {short(c['old'])} -> {short(c['new'])}" for c in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"  ... and {len(changes) - limit} more")
    return "\n".join(lines)
