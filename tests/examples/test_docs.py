"""The documentation: every exception and wire error code is explained in the
troubleshooting guide, and every relative link in the docs points at a file and heading
that exist."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import corral.errors
from corral.errors import ERROR_CODES, CorralError

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"

# Modules that define CorralError subclasses of their own (driver-flavoured errors).
_ERROR_MODULES = (
    "corral.sandbox._psycopg_common",
    "corral.sandbox._asyncpg_conn",
)


def _subclasses(cls: type) -> set[type]:
    found: set[type] = set()
    sub: type
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def corral_exceptions() -> list[str]:
    for module in _ERROR_MODULES:
        importlib.import_module(module)
    defined = {
        obj
        for _, obj in inspect.getmembers(corral.errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == "corral.errors"
    }
    ours = {c for c in _subclasses(CorralError) if c.__module__.startswith("corral.")}
    return sorted(c.__name__ for c in defined | ours)


def test_every_exception_class_is_in_the_troubleshooting_guide() -> None:
    text = TROUBLESHOOTING.read_text()
    names = corral_exceptions()
    assert {"CorralError", "SandboxLockTimeout", "TemplateBuildError"} <= set(names)
    missing = [name for name in names if f"`{name}`" not in text and f"`{name} " not in text]
    assert missing == [], f"add these to docs/troubleshooting.md: {missing}"


def test_every_wire_error_code_is_in_the_troubleshooting_guide() -> None:
    text = TROUBLESHOOTING.read_text()
    missing = [code for code in ERROR_CODES if f"`{code}`" not in text]
    assert missing == [], f"add these codes to docs/troubleshooting.md: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


_DOC_FILES = sorted(
    [ROOT / "README.md", *DOCS.glob("*.md"), *(ROOT / "examples").glob("*/README.md")]
)


@pytest.mark.parametrize("doc", _DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        exists = path.exists()
        if not exists or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert broken == [], f"{doc.name}: broken links {broken}"
