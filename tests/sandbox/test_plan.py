"""The savepoint plan: which SQL, in which order, and the stack it keeps. Pure, no database."""

from __future__ import annotations

import pytest

from corral.errors import SandboxError
from corral.sandbox._plan import (
    DEFERRABLE_QUERY,
    AppState,
    EmulatedServerError,
    FrameKind,
    Plan,
    Step,
    classify,
)


def opened(**kwargs: object) -> Plan:
    plan = Plan(lock_timeout=None, **kwargs)  # type: ignore[arg-type]
    plan.open()
    plan.opened(False)
    return plan


def test_open_sets_a_bounded_lock_timeout_and_asks_for_deferrable_constraints() -> None:
    plan = Plan(lock_timeout=1.5, isolation_level="REPEATABLE READ")
    step = plan.open()
    assert step.sql == "BEGIN ISOLATION LEVEL REPEATABLE READ"
    assert step.ask == DEFERRABLE_QUERY  # asked after it, in the same round trip for psycopg
    assert step.script == step.sql + "; " + DEFERRABLE_QUERY
    assert plan.depth == 1
    # The setting rides on the first SQL the plan sends, before any savepoint...
    first = plan.before_statement(AppState(autocommit=True))
    assert first is not None
    assert first.sql == "SET LOCAL lock_timeout = 1500; SAVEPOINT corral_stmt"
    # ...once per transaction: again after an outer restore (a new transaction).
    assert "lock_timeout" not in plan.push_sandbox().sql
    plan.pop_sandbox()
    plan.restore()
    assert plan.push_sandbox().sql.startswith("SET LOCAL lock_timeout = 1500; ")
    quiet = Plan(lock_timeout=None, check_deferred=False)
    assert quiet.open().sql == "BEGIN"
    assert quiet.before_statement(AppState()).sql.startswith("SAVEPOINT")  # type: ignore[union-attr]
    with pytest.raises(SandboxError):
        plan.open()


def test_autocommit_statements_share_one_round_trip_of_savepoint_work() -> None:
    plan, app = opened(), AppState(autocommit=True)
    first = plan.before_statement(app)
    assert first is not None
    assert first.sql == "SAVEPOINT corral_stmt"
    assert plan.after_statement(app) is None  # released lazily...
    second = plan.before_statement(app)
    assert second is not None
    assert second.sql == "RELEASE SAVEPOINT corral_stmt; SAVEPOINT corral_stmt"  # ...here
    assert plan.statement_failed(app) == Step(
        "ROLLBACK TO SAVEPOINT corral_stmt; RELEASE SAVEPOINT corral_stmt", rolls_back=True
    )
    assert not app.frames
    assert [f.kind for f in plan.stack] == [FrameKind.SANDBOX]


def test_steps_say_whether_they_roll_back() -> None:
    """What a step does is data (asyncpg's adapter clears its failed-transaction flag on
    it), never read from the SQL text: a savepoint or query may contain "ROLLBACK"."""
    plan = opened(check_deferred=True)
    plan.push_sandbox()
    app, ro = AppState(), AppState(read_only=True)
    began = plan.before_statement(app)
    assert began is not None
    assert not began.rolls_back
    step, block = plan.block(app, '"ROLLBACK"')  # a name that is not a rollback
    assert not step.rolls_back
    ended = plan.end_block(app, block, commit=False)
    assert ended is not None
    assert ended.rolls_back
    committed = plan.commit(app)  # SET CONSTRAINTS check: ROLLBACK TO corral_check inside
    assert committed is not None
    assert "ROLLBACK" in committed.sql
    assert not committed.rolls_back
    plan.before_statement(ro)
    read_only = plan.commit(ro)  # a read-only transaction commits by rolling back
    assert read_only is not None
    assert read_only.rolls_back
    plan.before_statement(app)
    rolled = plan.rollback(app)
    assert rolled is not None
    assert rolled.rolls_back
    assert plan.restore().rolls_back
    assert plan.pop_sandbox().rolls_back
    assert plan.restore().rolls_back  # the outer level: ROLLBACK; BEGIN
    assert plan.pop_sandbox().rolls_back
    assert not Plan().open().rolls_back


def test_autocommit_with_deferrable_constraints_checks_after_each_statement() -> None:
    plan, app = opened(check_deferred=True), AppState(autocommit=True)
    plan.before_statement(app)
    step = plan.after_statement(app)
    assert step is not None
    assert "SET CONSTRAINTS ALL IMMEDIATE" in step.sql
    assert step.sql.endswith("RELEASE SAVEPOINT corral_stmt")
    assert step.undo == "ROLLBACK TO SAVEPOINT corral_stmt; RELEASE SAVEPOINT corral_stmt"


def test_implicit_transaction_commit_and_rollback() -> None:
    plan, app = opened(), AppState()
    step = plan.before_statement(app)
    assert step is not None
    assert step.sql.startswith("SAVEPOINT corral_tx_")
    name = app.frames[0].name
    assert plan.before_statement(app) is None  # already in the transaction
    assert plan.after_statement(app) is None
    commit = plan.commit(app)
    assert commit is not None
    assert commit.sql == f"RELEASE SAVEPOINT {name}"
    assert commit.undo == f"ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
    assert plan.commit(app) is None  # COMMIT outside a transaction: nothing
    plan.before_statement(app)
    rollback = plan.rollback(app)
    assert rollback is not None
    assert rollback.sql.startswith("ROLLBACK TO SAVEPOINT corral_tx_")
    assert not app.frames


def test_deferred_check_only_when_deferrable_constraints_exist() -> None:
    plan, app = opened(), AppState()
    plan.before_statement(app)
    assert "SET CONSTRAINTS" not in plan.commit(app).sql  # type: ignore[union-attr]
    plan.note_ddl(classify("ALTER TABLE t ADD FOREIGN KEY (a) REFERENCES u DEFERRABLE"))
    plan.before_statement(app)
    assert "SET CONSTRAINTS ALL IMMEDIATE" in plan.commit(app).sql  # type: ignore[union-attr]


def test_blocks_nest_as_savepoints() -> None:
    plan, app = opened(), AppState(autocommit=True)
    _, outer = plan.block(app)
    inner_step, inner = plan.block(app, '"named"')
    assert inner_step.sql == 'SAVEPOINT "named"'
    assert outer.kind is FrameKind.TRANSACTION
    assert inner.kind is FrameKind.NESTED
    rollback = plan.end_block(app, inner, commit=False)
    assert rollback is not None
    assert rollback.sql == 'ROLLBACK TO SAVEPOINT "named"; RELEASE SAVEPOINT "named"'
    assert app.frames == [outer]
    assert app.lost is None
    commit = plan.end_block(app, outer, commit=True)
    assert commit is not None
    assert commit.sql == f"RELEASE SAVEPOINT {outer.name}"
    assert app.frames == []


def test_rolling_back_past_another_apps_transaction_tells_that_app() -> None:
    plan, a, b = opened(), AppState(), AppState()
    plan.before_statement(a)
    plan.before_statement(b)  # b's savepoint sits above a's
    plan.rollback(a)
    assert b.frames == []
    with pytest.raises(SandboxError, match="no longer exists"):
        plan.before_statement(b)
    assert plan.before_statement(b) is not None  # told once; then a fresh transaction


def test_a_commit_above_a_lenders_read_transaction_survives_its_rollback() -> None:
    # a's transaction has only read when b (a borrower) commits above it: in production
    # a's rollback cannot undo b's commit, so a's savepoint is re-opened above it.
    plan, a, b = opened(), AppState(), AppState()
    plan.before_statement(a)
    base = a.frames[0]
    plan.before_statement(b)
    step = plan.commit(b)
    assert step is not None
    assert step.sql.endswith(f"; RELEASE SAVEPOINT {base.name}; SAVEPOINT {base.name}")
    assert a.frames == [base]
    assert plan.stack[-1] is base
    a.wrote = True  # once a has written, b's commit goes into a's transaction (LIFO)
    plan.before_statement(b)
    step = plan.commit(b)
    assert step is not None
    assert step.sql.count("SAVEPOINT") == 1


def test_committing_past_another_apps_transaction_merges_it() -> None:
    plan, a, b = opened(), AppState(), AppState()
    plan.before_statement(a)
    plan.before_statement(b)
    plan.commit(a)
    assert b.frames == []
    assert b.lost is None
    assert plan.commit(b) is None


def test_nested_sandboxes_and_restore() -> None:
    plan, app = opened(), AppState()
    push = plan.push_sandbox()
    assert push.sql.startswith("SAVEPOINT corral_sandbox_")
    assert plan.depth == 2
    plan.before_statement(app)
    restore = plan.restore()
    assert restore.sql.startswith("ROLLBACK TO SAVEPOINT corral_sandbox_")
    assert app.lost is not None  # its transaction was rolled back under it
    app.lost = None
    pop = plan.pop_sandbox()
    assert pop.sql.startswith("ROLLBACK TO SAVEPOINT corral_sandbox_")
    assert plan.depth == 1
    outer_restore = plan.restore()
    assert outer_restore.sql.startswith("ROLLBACK; BEGIN")
    assert plan.pop_sandbox().sql == "ROLLBACK"
    assert plan.depth == 0
    with pytest.raises(SandboxError):
        plan.restore()


def test_read_only_transactions_end_by_rolling_back_their_savepoint() -> None:
    plan, app = opened(), AppState(autocommit=True)
    step = plan.begin(app, classify("BEGIN READ ONLY"))
    assert step is not None
    assert step.sql.endswith("SET TRANSACTION READ ONLY")
    commit = plan.commit(app)
    assert commit is not None
    assert commit.sql.startswith("ROLLBACK TO SAVEPOINT")


def test_app_savepoints_are_tracked() -> None:
    plan, app = opened(), AppState(autocommit=True)
    with pytest.raises(EmulatedServerError) as info:
        plan.check_user_savepoint(app, classify("SAVEPOINT a"))
    assert info.value.sqlstate == "25P01"
    plan.begin(app)
    plan.user_savepoint_done(app, classify("SAVEPOINT a"))
    _, nested = plan.block(app)
    plan.user_savepoint_done(app, classify("ROLLBACK TO SAVEPOINT a"))
    assert nested not in app.frames
    assert [f.kind for f in app.frames] == [FrameKind.TRANSACTION, FrameKind.USER]
    plan.user_savepoint_done(app, classify("RELEASE a"))
    assert [f.kind for f in app.frames] == [FrameKind.TRANSACTION]


def test_close_tells_open_transactions() -> None:
    plan, app = opened(), AppState()
    plan.before_statement(app)
    assert plan.close() == "ROLLBACK"
    with pytest.raises(SandboxError):
        plan.before_statement(app)


def test_session_advisory_locks_are_freed_with_the_level_whose_sql_named_them() -> None:
    plan = opened()
    plan.note_sql("SELECT count(*) FROM item")
    assert plan.close() == "ROLLBACK"  # no SQL named them: nothing more to send
    plan = opened()
    plan.note_sql("SELECT PG_Advisory_Lock(1)")
    plan.push_sandbox()
    assert plan.pop_sandbox().sql == "ROLLBACK TO SAVEPOINT corral_sandbox_1; RELEASE " + (
        "SAVEPOINT corral_sandbox_1"
    )  # the outer level took it: it outlives the nested one
    plan.push_sandbox()
    plan.note_sql("SELECT pg_advisory_lock(2)")
    assert plan.restore().sql == (
        "ROLLBACK TO SAVEPOINT corral_sandbox_2; SELECT pg_catalog.pg_advisory_unlock_all()"
    )
    assert plan.pop_sandbox().sql.endswith("RELEASE SAVEPOINT corral_sandbox_2")
    # pg_advisory_unlock_all() freed the outer level's lock too: nothing left to free.
    assert plan.close() == "ROLLBACK"
    plan = opened()
    plan.note_sql("SELECT pg_advisory_lock(3)")
    assert plan.restore().sql.startswith("ROLLBACK; SELECT pg_catalog.pg_advisory_unlock_all(); ")
    plan.note_sql("SELECT pg_advisory_lock(3)")
    assert plan.close() == "ROLLBACK; SELECT pg_catalog.pg_advisory_unlock_all()"
