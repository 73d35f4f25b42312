"""README.md model card written beside an export: architecture, method, recipe, data, metrics, input format, sha256
and the lines that load it in the target library."""
from __future__ import annotations

import json

LOADERS = {
    "timm": ("import json, timm\nfrom safetensors.torch import load_file\n\n"
             "cfg = json.load(open(\"config.json\"))\n"
             "model = timm.create_model(cfg[\"model\"], pretrained=False, **cfg[\"kwargs\"])\n"
             "model.load_state_dict(load_file(\"model.safetensors\"))  # strict: every key matches\n"),
    "torchvision": ("import json\nfrom safetensors.torch import load_file\n"
                    "from ssl_kit.models.export import build_exported  # or apply cfg[\"replace\"] by hand\n\n"
                    "cfg = json.load(open(\"config.json\"))\n"
                    "model = build_exported(cfg)  # torchvision.models.get_model + the replaced modules\n"
                    "model.load_state_dict(load_file(\"model.safetensors\"))\n"),
    "ssl_kit": ("import json\nfrom safetensors.torch import load_file\n"
                "from ssl_kit.models.export import build_exported\n\n"
                "cfg = json.load(open(\"config.json\"))\n"
                "model = build_exported(cfg)\n"
                "model.load_state_dict(load_file(\"model.safetensors\"))\n"),
    "onnx": ("import json\nimport numpy as np\nimport onnxruntime as ort\n\n"
             "cfg = json.load(open(\"config.json\"))\n"
             "session = ort.InferenceSession(\"model.onnx\", providers=[\"CPUExecutionProvider\"])\n"
             "images = np.zeros((8, *cfg[\"input_size\"]), np.float32)  # any batch size; normalised with mean/std\n"
             "features = session.run([\"features\"], {\"images\": images})[0]  # (8, num_features)\n"),
}
TIMM_LOCAL_DIR = ("\n# or, with timm's own loader (timm >= 1.0.16; nothing is downloaded):\n"
                  "model = timm.create_model(\"local-dir:/path/to/this/folder\", pretrained=True)\n")


def _replace_lines(config: dict) -> list[str]:
    lines = []
    for path, spec in config.get("replace", {}).items():
        args = {k: v for k, v in spec.items() if k != "type"}
        lines.append(f"- `model.{path} = nn.{spec['type']}({', '.join(f'{k}={v}' for k, v in args.items())})`")
    return lines


def _verification_rows(config: dict) -> list[str]:
    if config["library"] != "onnx":
        return [f"| verification | strict load, max abs difference to the ssl_kit backbone "
                f"{config['verified_max_abs_diff']:.3g} on random input |"]
    onnx = config["onnx"]
    rows = [f"| ONNX | opset {onnx['opset']}, input `{onnx['input']}` {onnx['input_shape']}, output "
            f"`{onnx['output']}` {onnx['output_shape']}; {onnx['exporter']} |"]
    if onnx.get("external_data"):
        rows.append(f"| {onnx['external_data']} sha256 | `{onnx['external_data_sha256']}` |")
    rows.append(f"| verification | {onnx['verified_with']} on random batches of {onnx['verified_batches']}: max abs "
                f"difference to the ssl_kit backbone {config['verified_max_abs_diff']:.3g}, "
                f"{config['verified_max_rel_diff']:.3g} of the largest feature (tolerance "
                f"{onnx['tolerance_relative']:g}) |")
    return rows


def model_card(config: dict, context: dict) -> str:
    """config: config.json content (with sha256); context: optional 'recipe', 'methods' (stage -> method),
    'dataset', 'metrics' ({key: value}) of the run the backbone came from."""
    channels, height, width = config["input_size"]
    weights = config["onnx"]["file"] if config["library"] == "onnx" else "model.safetensors"
    lines = [f"# {config['library']} {config['model']} (ssl_kit export)", "",
             "| | |", "| --- | --- |",
             f"| library / model | `{config['library']}` / `{config['model']}` |",
             f"| constructor kwargs | `{json.dumps(config['kwargs'])}` |",
             f"| ssl_kit architecture | `{config['ssl_kit']['arch']}` `{json.dumps(config['ssl_kit']['kwargs'])}` |",
             f"| method | {', '.join(f'{k}: {v}' for k, v in context.get('methods', {}).items()) or 'unknown'} |",
             f"| recipe | {context.get('recipe') or 'unknown'} |",
             f"| data | {context.get('dataset') or 'unknown'} |",
             f"| input | {channels} × {height} × {width}, float in [0, 1] normalised with mean "
             f"{[round(m, 4) for m in config['mean']]}, std {[round(s, 4) for s in config['std']]} |",
             "| output | pooled pre-logits features (no classifier) |",
             f"| {weights} sha256 | `{config['sha256']}` |", *_verification_rows(config), ""]
    replaced = _replace_lines(config)
    if replaced:
        lines += ["Modules replaced after construction (config.json `replace`):", *replaced, ""]
    metrics = context.get("metrics") or {}
    if metrics:
        lines += ["## Metrics of the run", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    loader = LOADERS[config["library"]] + (TIMM_LOCAL_DIR if config["library"] == "timm" else "")
    lines += ["## Load it", "", "```python", loader.rstrip(), "```", ""]
    return "\n".join(lines)
