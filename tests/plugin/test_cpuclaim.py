"""Machine-wide CPU claims: concurrent runs' test processes pin to different CPUs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral._plugin._cpuclaim import ENV_CLAIMS, claim_cpu, claims_dir


def test_claims_go_to_the_first_free_cpu_in_order(tmp_path: Path) -> None:
    first = claim_cpu([3, 1, 2], tmp_path)
    second = claim_cpu([3, 1, 2], tmp_path)
    third = claim_cpu([3, 1, 2], tmp_path)
    assert first is not None
    assert second is not None
    assert third is not None
    assert (first.cpu, second.cpu, third.cpu) == (3, 1, 2)
    assert first.held
    assert second.held
    assert third.held
    assert claim_cpu([3, 1, 2], tmp_path) is None  # every one taken
    second.release()
    second.release()  # idempotent
    again = claim_cpu([3, 1, 2], tmp_path)
    assert again is not None
    assert again.cpu == 1
    for claim in (first, third, again):
        claim.release()
    assert claim_cpu([], tmp_path) is None


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from corral._plugin._cpuclaim import claim_cpu
    claim = claim_cpu([0], Path(sys.argv[1]))
    print(claim.cpu if claim is not None else "none", flush=True)
    time.sleep(60)
    """
)


def test_a_killed_holder_frees_its_cpu_at_once(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "0"
            assert claim_cpu([0], tmp_path) is None  # another process sits there
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=10)
            claim = claim_cpu([0], tmp_path)
            assert claim is not None
            assert claim.held
            assert claim.cpu == 0
            claim.release()
        finally:
            holder.kill()


def test_where_claims_cannot_be_made_it_pins_as_before(tmp_path: Path) -> None:
    claim = claim_cpu([5, 6], tmp_path / "missing")
    assert claim is not None
    assert (claim.cpu, claim.held) == (5, False)
    claim.release()


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "corral-cpu-0.lock").symlink_to(target)
    claim = claim_cpu([0], tmp_path)
    assert claim is not None
    assert not claim.held
    assert not target.exists()


def test_the_directory_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_CLAIMS, str(tmp_path))
    assert claims_dir() == tmp_path
    claim = claim_cpu([0])
    assert claim is not None
    assert claim.held
    assert (tmp_path / "corral-cpu-0.lock").exists()
    claim.release()
    monkeypatch.delenv(ENV_CLAIMS)
    assert claims_dir() != tmp_path


def test_a_planted_fifo_neither_hangs_nor_claims(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "corral-cpu-0.lock")  # open() of a FIFO blocks without O_NONBLOCK
    claim = claim_cpu([0], tmp_path)
    assert claim is not None
    assert not claim.held


def test_claim_files_are_readable_by_all_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        claim = claim_cpu([0], tmp_path)
    finally:
        os.umask(old)
    assert claim is not None
    assert claim.held
    assert (tmp_path / "corral-cpu-0.lock").stat().st_mode & 0o777 == 0o644
    claim.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_another_users_claim_file_is_used_as_it_is(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: world-writable and sticky
    path = shared / "corral-cpu-0.lock"
    path.touch(mode=0o644)
    os.chown(path, 65534, 65534)  # nobody's, as if another user's run made it
    claim = claim_cpu([0], shared)
    assert claim is not None
    assert claim.held
    assert path.stat().st_uid == 65534  # opened, not replaced
    claim.release()
