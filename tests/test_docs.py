"""The documentation site (docs/ + mkdocs.yml) builds without warnings, every registered method has a section in
docs/methods.md, and no page points at files outside the repository."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _mkdocs_command() -> list[str]:
    """mkdocs of this interpreter's environment (python -m mkdocs), else one on PATH; skip when neither exists."""
    try:
        import mkdocs  # noqa: F401  (only whether it is installed)
        import material  # noqa: F401  (the theme mkdocs.yml names)
    except ImportError as error:
        if shutil.which("mkdocs") is None:
            pytest.skip(f"mkdocs-material is not installed ({error}); pip install -e '.[docs]' to build the docs")
        return ["mkdocs"]
    return [sys.executable, "-m", "mkdocs"]


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing anchor, a page left out of the nav or a nav entry without
    its page is a warning, and strict mode turns warnings into a failed build."""
    command = _mkdocs_command() + ["build", "--strict", "--site-dir", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "methods" / "index.html").is_file()


def test_every_registered_method_has_a_section_in_methods_md():
    import ssl_kit.methods  # noqa: F401  (importing the package registers every method)
    from ssl_kit.methods.registry import registered_methods

    headings = [line for line in (DOCS / "methods.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("#")]
    named = {name for line in headings for name in re.findall(r"`([^`]+)`", line)}
    missing = sorted(set(registered_methods()) - named)
    assert not missing, f"docs/methods.md has no heading naming these methods in backticks: {missing}"


# a parent-relative path written anywhere in a page ("../x/y.md"), not an ellipsis ("…/x" or ".../x")
PARENT_PATH = re.compile(r"(?<![\w./])((?:\.\./)+[\w.\-/]+)")


def test_no_page_points_outside_the_repository():
    """Users have only the repository: every parent-relative path a page names (in a link or in its text) must be a
    file or folder inside it."""
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    for page in pages:
        for path in PARENT_PATH.findall(page.read_text(encoding="utf-8")):
            target = (page.parent / path).resolve()
            assert target.is_relative_to(ROOT) and target.exists(), \
                f"{page.relative_to(ROOT)} names {path!r}, which is not in the repository"


def test_parent_paths_outside_the_repository_are_caught(tmp_path):
    """The check above on made-up text: a path escaping the repository or naming a missing file is found."""
    text = "see ../../notes/plan.md and ../missing/plan.md, not .../summary.json"
    assert PARENT_PATH.findall(text) == ["../../notes/plan.md", "../missing/plan.md"]
    assert not (DOCS / "../missing/plan.md").resolve().exists()
    assert not (DOCS / "../../notes/plan.md").resolve().is_relative_to(ROOT)


def test_readme_links_to_docs_pages_that_exist():
    """README links into docs/ by relative path (so they work on GitHub); each target page must exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert targets, "README.md links to no docs/ page"
    missing = sorted({target for target in targets if not (ROOT / target).is_file()})
    assert not missing, f"README.md links to missing pages: {missing}"
