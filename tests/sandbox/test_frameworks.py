"""The frameworks issue 6 names, used the way their docs prescribe, on a sandboxed engine:
Flask-SQLAlchemy's ``db.session`` (through Flask's test client) and SQLModel's ``Session``.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.orm import Mapped, mapped_column

from corral.sandbox import sandbox
from tests.sandbox._adapters import sqlalchemy_url


def count_outside(outside: Any) -> int:
    n: int = outside.execute("SELECT count(*) FROM item").fetchone()[0]
    return n


def test_flask_sqlalchemy_db_session(sandbox_dsn: str, outside: Any) -> None:
    flask = pytest.importorskip("flask")
    flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")

    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = sqlalchemy_url(sandbox_dsn, "psycopg")
    db = flask_sqlalchemy.SQLAlchemy(app)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "item"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(unique=True)

    @app.post("/items/<name>")
    def add(name: str) -> dict[str, int]:
        db.session.add(Item(name=name))
        db.session.commit()  # the view commits, as in production
        return {"count": db.session.query(Item).count()}

    with app.app_context():
        box: Any = sandbox(db.engine, mode="sandbox")
    client = app.test_client()
    try:
        with box.sandboxed():
            assert client.post("/items/a").json == {"count": 1}
            assert client.post("/items/b").json == {"count": 2}
            assert client.post("/items/a").status_code == 500  # unique violation
            with app.app_context():
                assert db.session.query(Item).count() == 2  # usable after the error
            assert count_outside(outside) == 0
        with box.sandboxed(), app.app_context():
            assert db.session.query(Item).count() == 0
    finally:
        box.close()
        box.remove()
        with app.app_context():
            db.engine.dispose()


def test_sqlmodel_session(sandbox_dsn: str, outside: Any) -> None:
    sqlmodel = pytest.importorskip("sqlmodel")

    class Item(sqlmodel.SQLModel, table=True):  # type: ignore[call-arg,misc,name-defined]
        __tablename__ = "item"
        id: int | None = sqlmodel.Field(default=None, primary_key=True)
        name: str

    engine = sqlmodel.create_engine(sqlalchemy_url(sandbox_dsn, "psycopg"))
    box: Any = sandbox(engine, mode="sandbox")
    try:
        with box.sandboxed():
            with sqlmodel.Session(engine) as session:
                session.add(Item(name="hero"))
                session.commit()
            with sqlmodel.Session(engine) as session:
                names = [i.name for i in session.exec(sqlmodel.select(Item)).all()]
            assert names == ["hero"]
            assert count_outside(outside) == 0
    finally:
        box.close()
        box.remove()
        engine.dispose()
        sqlmodel.SQLModel.metadata.clear()
        assert isinstance(engine, sqlalchemy.Engine)
