"""The blocking modules generated from asyncio sources are what the generator makes now.

``tools/async_to_sync.py`` writes each blocking twin from its asyncio source; a file edited
by hand, or a source changed without regenerating, fails here (and so in CI).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("async_to_sync", ROOT / "tools/async_to_sync.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


TOOL = load_tool()


@pytest.mark.parametrize("twin", TOOL.TWINS, ids=lambda twin: twin.target)
def test_generated_module_is_up_to_date(twin: object) -> None:
    target = ROOT / twin.target  # type: ignore[attr-defined]
    assert target.read_text() == TOOL.generate(twin), (
        f"{twin.target} differs from what tools/async_to_sync.py generates from "  # type: ignore[attr-defined]
        f"{twin.source}: edit the source, then run `python tools/async_to_sync.py`"  # type: ignore[attr-defined]
    )
