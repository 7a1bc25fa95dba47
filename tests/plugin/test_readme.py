"""The README's quickstart suite runs as written, in parallel, with corral's own server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.plugin._checks import SAMPLE, assert_nothing_left, facts

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart_files() -> dict[str, str]:
    """``{file name: content}`` of the quickstart's blocks that start with ``# name``."""
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    section = section[: section.index("\n## ", 1)]
    files = {}
    for body in re.findall(r"```\w+\n(.*?)```", section, flags=re.S):
        first = body.splitlines()[0]
        match = re.fullmatch(r"(?:#|--) ([\w.]+)(?::.*)?", first)
        if match:
            files[match.group(1)] = body
    return files


# pytest-asyncio (installed with corral's dev extra) warns at start-up when a suite leaves
# its loop scope unset, as the README's does; pytest >= 9.1 makes that a start-up error
# under -W error. The README's suite has no async test, so that warning is not its business.
ASYNCIO_UNSET = 'ignore:The configuration option "asyncio_default_fixture_loop_scope" is unset'


@pytest.mark.slow
def test_readme_quickstart_runs_in_parallel(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No CORRAL_DSN, as in the README: corral starts (and stops) its own server.
    files = quickstart_files()
    assert set(files) == {"pyproject.toml", "schema.sql", "app.py", "test_app.py"}
    for path in list(inner.path.iterdir()):  # not the sample suite: only the README's
        if path.is_file():
            path.unlink()
    for name, content in files.items():
        (inner.path / name).write_text(content)
    # The sample's conftest.py records the run's facts (it imports app.py, as the README's
    # test does).
    (inner.path / "conftest.py").write_text((SAMPLE / "conftest.py").read_text())
    monkeypatch.setenv("SAMPLE_FACTS", str(inner.path / "facts.json"))
    result = inner.runpytest_subprocess("-n", "2", "-W", "error", "-W", ASYNCIO_UNSET, "-v")
    result.assert_outcomes(passed=100)
    result.stdout.fnmatch_lines(["*postgres start: * ms*", "*template: * ms*"])
    info = facts(inner.path / "facts.json")
    assert info["url"].startswith("postgresql://postgres:")  # TCP, with a password
    assert "@127.0.0.1:" in info["url"]
    assert "corral-pg" in info["server_dir"]  # corral's own server
    assert_nothing_left(info, None)
