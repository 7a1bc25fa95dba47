"""Names a package re-exports but imports at first use (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for *package*: each name of *where* is imported from
    its module when first asked for, then kept in the package like an eager import.

    Usage, in the package's ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__,
    {"Client": "corral.broker.client"})``. A name mapped to the package's submodule of that
    name (``{"errors": "corral.errors"}``) is that submodule.
    """
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        source = where.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = importlib.import_module(source)
        if source != f"{package}.{name}":
            value = getattr(value, name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(getattr(module, "__all__", ())) | set(where))

    return __getattr__, __dir__
