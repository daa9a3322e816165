"""Fault injection (bench/fault_injection.py): a two-process run, each process under its own
supervisor, one process killed with SIGKILL mid-save, then between steps and again while the
restarted process restores; the run recovers with no human and ends with the losses of the
same run uninterrupted, bit for bit. The benchmark runs ten trials and reports each recovery
time in docs/performance.md."""

import pytest

from bench.fault_injection import run_trials


@pytest.mark.slow
def test_kill_9_of_either_process_at_any_moment_recovers_by_itself_and_changes_no_number(tmp_path):
    # The mid-restore trial kills twice: between steps, then the restarted process in its restore.
    out = run_trials(tmp_path, trials=2, seed=1, moments=("mid-save", "mid-restore"))
    assert out["exit_codes"] == [0, 0], "\n".join(out["tails"])
    assert [t["moment"] for t in out["trials"]] == ["mid-save", "mid-restore"]
    assert out["restarts"] >= 2 * 3  # both processes restart after each of the three kills
    assert out["identical"], "\n".join(out["tails"])
    assert all(t["recovery_s"] > 0 for t in out["trials"])
