"""The public API is what ``__all__`` says, sorted, and every name in it exists."""

from __future__ import annotations

import importlib

import pytest

PUBLIC_MODULES = ["corral", "corral.broker", "corral.postgres", "corral.sandbox"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        pytest.skip(f"{name} has no __all__")
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    missing = [attr for attr in exported if not hasattr(module, attr)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


def test_every_error_is_a_corral_error() -> None:
    from corral import errors

    for obj in vars(errors).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseException)
            and obj.__module__ == errors.__name__
        ):
            assert issubclass(obj, errors.CorralError), obj


def test_error_codes_map_to_request_errors() -> None:
    from corral.errors import ERROR_CODES, KeyNotFound, error_from_code

    for code, cls in ERROR_CODES.items():
        exc = error_from_code(code, key="k")
        assert type(exc) is cls
        assert exc.code == code
        assert code in str(exc)
    missing = error_from_code("expired", key="k")
    assert issubclass(KeyNotFound, KeyError)
    assert isinstance(missing, KeyNotFound)
    assert missing.expired
    with pytest.raises(KeyError, match="expired"):
        raise missing
