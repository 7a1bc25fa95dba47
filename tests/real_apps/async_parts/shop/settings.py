"""Settings read from the environment once, cached for the life of the process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy.engine import URL


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    user: str
    password: str
    name: str

    def url(self, driver: str) -> URL:
        return URL.create(
            driver,
            username=self.user,
            password=self.password or None,
            host=self.host,
            port=self.port,
            database=self.name,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings(
        host=os.environ.get("DB_HOST", "localhost"),
        port=int(os.environ.get("DB_PORT", "5432")),
        user=os.environ.get("DB_USER", "postgres"),
        password=os.environ.get("DB_PASSWORD", ""),
        name=os.environ.get("DB_NAME", "shop"),
    )
