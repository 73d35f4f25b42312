"""The wheel is the product, and start-up stays light (issue 26).

1. The wheel built from this tree carries everything a command reads at run time (the bundled recipes as package
   data, the version from ssl_kit/_version.py). Installed into a fresh virtual environment and run from a folder
   outside the checkout, `ssl-kit --version`, `ssl-kit recipes` and a shortened `ssl-kit run quickstart` work, and
   the run's env.json records that version.
2. `import ssl_kit`, `import ssl_kit.losses` and `ssl-kit --help / --version / recipes` load only what they need:
   each runs in a fresh interpreter that reports its sys.modules. (Start-up times: benchmarks/startup.py.)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ssl_kit._version import __version__
from ssl_kit.cli import bundled_recipe_dir, bundled_recipes
from ssl_kit.errors import SslKitError

ROOT = Path(__file__).resolve().parents[1]
# what the package needs to build, copied so that the build never writes build/ or *.egg-info into the checkout
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in", "ssl_kit")
# heavy third-party packages that no light entry point may load
HEAVY = ("torch", "torchvision", "numpy", "pydantic", "kornia", "timm", "matplotlib", "faiss", "scipy", "sklearn",
         "PIL", "cv2", "safetensors", "einops", "wandb")
# shortened quickstart: every stage still runs (SimCLR → FixMatch → probe → kNN → transfer to printed digits,
# whose glyphs come from the installed matplotlib's fonts), each for a step or an epoch
QUICKSTART_OVERRIDES = [
    "pretrain.train.steps=2", "pretrain.train.batch_size=64", "pretrain.train.progress=false",
    "fixmatch.train.steps=2", "fixmatch.train.progress=false", "fixmatch.train.eval_every_epochs=0",
    "linear_probe.epochs=1", "linear_probe.sweep=false",
    "transfer.epochs=1", "transfer.sweep=false", "transfer.oracle=false", "transfer.tsne=false",
    "transfer.targets=[digits-printed]", "transfer.adapt=[]",
]


# ---------------------------------------------------------------------------------------------------- the wheel

def _clean_env(**extra: str) -> dict:
    """The environment without anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", MPLBACKEND="Agg", WANDB_MODE="offline", **extra)
    return env


def _run(command: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(out: Path) -> Path:
    """`pip wheel` of a copy of the tree, no network (no build isolation: setuptools comes from this environment)."""
    source = out / "src"
    source.mkdir(parents=True)
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out / "dist", source], out, _clean_env())
    wheels = sorted((out / "dist").glob("ssl_kit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def install_wheel(wheel: Path, venv: Path) -> Path:
    """A fresh virtual environment holding the wheel, which finds the dependencies in this environment's
    site-packages through a .pth line. A path line adds the folder only: the .pth files inside it (this checkout's
    editable-install finder) are not run, so `import ssl_kit` can only find the wheel's copy."""
    _run([sys.executable, "-m", "venv", "--without-pip", venv], venv.parent, _clean_env())
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         venv.parent, _clean_env())
    inner = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    outer |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    (inner / "_ssl_kit_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(outer) if Path(p).is_dir()))
    return venv / "bin"


@pytest.mark.slow
def test_the_wheel_carries_what_commands_need_and_runs_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = sorted(p.name for p in bundled_recipe_dir().glob("*.yaml"))
    assert "quickstart.yaml" in bundled and len(bundled) >= 10
    assert {f"ssl_kit/recipes/{name}" for name in bundled} <= names, "recipes missing from the wheel"
    assert not any(n.startswith("recipes/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"ssl_kit-{__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {__version__}\n" in metadata  # pyproject reads ssl_kit/_version.py

    bin_dir = install_wheel(wheel, tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"  # a working directory outside the checkout, without ./recipes
    elsewhere.mkdir()
    env = _clean_env(SSL_KIT_CACHE=str(tmp_path / "cache"))
    probe = _run([bin_dir / "python", "-c", "import json, importlib.metadata as m, ssl_kit, ssl_kit.cli as c; "
                  "print(json.dumps([ssl_kit.__file__, str(c.bundled_recipe_dir()), m.version('ssl_kit')]))"],
                 elsewhere, env)
    module_file, recipe_dir, installed_version = json.loads(probe.stdout)
    venv = (tmp_path / "venv").resolve()
    assert Path(module_file).resolve().is_relative_to(venv), f"imported {module_file}, not the wheel's copy"
    assert Path(recipe_dir).resolve().is_relative_to(venv) and installed_version == __version__

    assert _run([bin_dir / "ssl-kit", "--version"], elsewhere, env).stdout.strip() == f"ssl-kit {__version__}"
    listed = _run([bin_dir / "ssl-kit", "recipes"], elsewhere, env).stdout
    assert {line.split()[0] for line in listed.splitlines() if line.strip()} >= {Path(n).stem for n in bundled}

    out = tmp_path / "run"
    _run([bin_dir / "ssl-kit", "run", "quickstart", *QUICKSTART_OVERRIDES, "--out", out], elsewhere, env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["_completed_stages"] == ["pretrain", "fixmatch", "linear_probe", "knn", "transfer"]
    assert 0.0 <= summary["transfer/digits-printed/top1"] <= 1.0
    recorded = json.loads((out / "env.json").read_text())
    assert recorded["ssl_kit"] == __version__ and recorded["git_commit"] is None  # an installed wheel, no checkout
    for path in out.rglob("*"):
        if path.suffix in (".json", ".jsonl", ".yaml", ".md"):
            assert str(ROOT) not in path.read_text(errors="replace"), f"{path} refers to the checkout"


# ------------------------------------------------------------------------------------------------------ start-up

def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """sys.modules of a fresh interpreter after running `code`."""
    script = f"import sys\n{code}\nprint('\\n' + repr(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return set(eval(result.stdout.strip().splitlines()[-1]))  # noqa: S307  (our own repr of a list of str)


def _loaded(modules: set[str], names) -> list[str]:
    return sorted(n for n in names if n in modules)


def _ours(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "ssl_kit" or m.startswith("ssl_kit.")}


def test_import_ssl_kit_loads_nothing_heavy(tmp_path):
    modules = _modules_after("import ssl_kit\nassert ssl_kit.__version__", tmp_path)
    assert _loaded(modules, HEAVY + ("yaml",)) == []
    assert _ours(modules) == {"ssl_kit", "ssl_kit._version"}


CLI_CALL = """
from ssl_kit.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
assert code in (0, None), code
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["recipes"], ["run", "--help"]])
def test_cli_help_version_and_recipes_load_no_torch(argv, tmp_path):
    modules = _modules_after(CLI_CALL.format(argv=argv), tmp_path)
    assert _loaded(modules, HEAVY) == []
    # limits: the environment knobs every command checks first (standard library only)
    assert _ours(modules) <= {"ssl_kit", "ssl_kit._version", "ssl_kit.errors", "ssl_kit.cli", "ssl_kit.limits"}


@pytest.mark.parametrize("code", ["import ssl_kit.losses", "from ssl_kit.losses import nt_xent_loss"])
def test_losses_load_torch_and_the_losses_only(code, tmp_path):
    modules = _modules_after(code, tmp_path)
    assert "torch" in modules
    assert _loaded(modules, [h for h in HEAVY if h not in ("torch", "numpy")] + ["yaml"]) == []
    others = {m for m in _ours(modules) if not m.startswith(("ssl_kit.losses", "ssl_kit.common"))}
    assert others <= {"ssl_kit", "ssl_kit._version", "ssl_kit.errors"}, others
    assert "ssl_kit.common.plots" not in modules


def test_the_recipe_schema_loads_the_method_registry_itself(tmp_path):
    """Nothing relies on `import ssl_kit` registering the methods any more: validating a recipe in a fresh
    interpreter that imported only the loader knows every method."""
    code = ("from ssl_kit.recipe_files import load_recipe\nfrom ssl_kit.cli import find_recipe\n"
            "recipe = load_recipe(find_recipe('quickstart'))\n"
            "assert [s.method for s in recipe.stages][:2] == ['simclr', 'fixmatch'], recipe.stages")
    assert {"ssl_kit.methods", "ssl_kit.methods.contrastive", "ssl_kit.methods.fixmatch"} <= _modules_after(code, tmp_path)


def test_the_facade_resolves_its_names_lazily():
    import ssl_kit
    import ssl_kit.engine.checkpoint
    import ssl_kit.errors

    assert ssl_kit.load_backbone is ssl_kit.engine.checkpoint.load_backbone
    assert ssl_kit.methods is sys.modules["ssl_kit.methods"] and "simclr" in ssl_kit.methods.registered_methods()
    for name in ("SslKitError", "ConfigError", "DataError", "CheckpointError", "TrainingError"):
        assert getattr(ssl_kit, name) is getattr(ssl_kit.errors, name)
    assert set(ssl_kit.__all__) <= set(dir(ssl_kit))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ssl_kit.nope  # noqa: B018


def test_recipes_in_the_working_directory_are_found_first_and_listed(tmp_path, monkeypatch, capsys):
    from ssl_kit.cli import find_recipe, main

    (tmp_path / "recipes").mkdir()
    quickstart = (bundled_recipe_dir() / "quickstart.yaml").read_text()
    (tmp_path / "recipes" / "quickstart.yaml").write_text(quickstart.replace("description: ", "description: MINE ", 1))
    (tmp_path / "recipes" / "mine.yaml").write_text("description: my own\nseed: 0\nstages: []\n")
    monkeypatch.chdir(tmp_path)
    assert find_recipe("quickstart").resolve() == (tmp_path / "recipes" / "quickstart.yaml").resolve()
    assert "shadows the bundled one" in capsys.readouterr().err
    assert find_recipe("mine.yaml").resolve() == (tmp_path / "recipes" / "mine.yaml").resolve()
    assert find_recipe("supervised_digits").parent == bundled_recipe_dir()
    with pytest.raises(SslKitError) as refused:  # a near miss is named, not all 60-odd recipes
        find_recipe("fixmatch_digits")
    message = str(refused.value)
    assert "did you mean fixmatch_digits_40, simclr_then_fixmatch_digits" in message
    assert "vicreg_digits" not in message and f"lists all {len(bundled_recipes()) + 1}" in message  # + ./recipes/mine
    with pytest.raises(SslKitError, match="did you mean mine\\?"):
        find_recipe("mines")
    with pytest.raises(SslKitError, match="did you mean dinov2_digits, dinov2_vit_small_imagefolder, dino_"):
        find_recipe("dinov3")
    assert main(["recipes"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    bundled, local = [line for line in lines if line.split()[0] == "quickstart"]  # the bundled one first
    assert "(shadowed by ./recipes)" in bundled and "MINE" in local and "recipes/quickstart.yaml" in local
    assert any(line.split()[0] == "mine" and "my own" in line for line in lines)
