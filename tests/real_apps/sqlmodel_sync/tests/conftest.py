"""Fixtures as the project templates write them: one Session for the whole run, one
TestClient per module. corral's only line is ``sandbox(engine)``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from app.core.db import engine
from app.main import app
from fastapi.testclient import TestClient
from sqlmodel import Session

from corral.sandbox import sandbox

engine_sandbox = sandbox(engine)


@pytest.fixture(scope="session")
def db() -> Iterator[Session]:
    with Session(engine) as session:
        yield session


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c
