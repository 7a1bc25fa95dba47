"""What the controller hands its test processes about the run's Django templates: read by
:mod:`._django` (which builds them) and :mod:`._django_fixtures` (which clones them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DjangoInfo"]

_MAX_NAME = 63


@dataclass(frozen=True)
class DjangoInfo:
    """The run's Django templates, as the workers need them (JSON in ``CORRAL_DJANGO``).

    :ivar groups: per test database: its aliases (the first is migrated), its template,
        the admin DSN of its server, and the ``HOST``/``PORT``/``USER``/``PASSWORD`` that
        point the aliases at that server (empty: the settings' own server).
    :ivar mirrors: ``TEST["MIRROR"]`` aliases -> the alias they mirror.
    :ivar others: aliases on other backends (SQLite...), which Django sets up itself.
    """

    run_id: str
    controller_pid: int
    clone_tag: str
    groups: list[dict[str, Any]]
    mirrors: dict[str, str] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DjangoInfo:
        return cls(**json.loads(text))

    def clone_name(self, index: int, worker: str) -> str:
        """``corral_<run>_dj<index>_<worker>`` (with the machine's tag in a Redis run)."""
        tag = f"_{self.clone_tag}" if self.clone_tag else ""
        name = f"corral_{self.run_id}_dj{index}{tag}_{worker}"
        if len(name) > _MAX_NAME:
            import hashlib

            digest = hashlib.sha1(name.encode()).hexdigest()[:10]
            name = f"corral_dj{index}_{digest}_{worker}"[:_MAX_NAME]
        return name
