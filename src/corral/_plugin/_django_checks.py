"""What Django support asks before and while it prepares the templates: whether it applies
to this run, whether xdist starts workers, whether a server answers, whether a template is
finished. Each only asks; :mod:`._django` decides.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

__all__ = ["probe", "starts_workers", "template_ready", "where", "why_not"]

#: Seconds a server at Django's settings gets to answer.
_PROBE_TIMEOUT = 3


def why_not(config: pytest.Config) -> str:
    """Why Django support cannot apply to this run ("" when it can)."""
    if not config.pluginmanager.hasplugin("django"):
        return "pytest-django is not active"
    if "django" not in sys.modules:
        return "pytest-django found no Django settings (DJANGO_SETTINGS_MODULE / --ds)"
    from django.conf import settings

    if not settings.configured:
        return "Django's settings are not configured"
    from corral._plugin._django_setup import is_postgres

    databases = dict(settings.DATABASES)
    if not any(is_postgres(d) for d in databases.values()):
        engines = ", ".join(sorted({str(d.get("ENGINE")) for d in databases.values()}))
        return f"no database uses PostgreSQL ({engines or 'no DATABASES'})"
    return ""


def starts_workers(config: pytest.Config) -> bool:
    """Whether this controller's run hands its tests to xdist workers (as xdist decides
    after its ``pytest_cmdline_main``); not with ``-n 0`` nor ``-p no:xdist``."""
    option = config.option
    return getattr(option, "dist", "no") != "no" and bool(getattr(option, "tx", None))


def probe(admin: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(admin, connect_timeout=_PROBE_TIMEOUT):
            return None
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def where(settings_dict: dict[str, Any]) -> str:
    """``host:port`` of a Django database's settings, for messages."""
    host = settings_dict.get("HOST") or "the default socket"
    port = settings_dict.get("PORT") or 5432
    return f"{host}:{port}"


def template_ready(admin: str, template: str) -> bool:
    """Whether a finished template of that name exists (a half-built one does not count:
    :func:`~corral.postgres.ensure_template` drops and rebuilds it)."""
    from corral.postgres._admin import admin as connect
    from corral.postgres._databases import template_ready as ready

    with connect(admin) as conn:
        return bool(ready(conn, template))
