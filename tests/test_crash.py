"""Crash anywhere, every stage: a reduced number of seeded SIGKILL points (more by hand:
``python tests/crash_harness.py --kills 30``; results in docs/reliability.md)."""
import pytest

from tests.crash_harness import harness, kill_in_commit, make_full_study


@pytest.mark.slow  # ~40 s of every stage run 5 times; the commit-step kills below and test_cli's kills stay in CI
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    config = make_full_study(tmp_path / "template")
    report = harness(config, tmp_path, kills=3, seed=0)
    assert len(report["points"]) == 3
    assert any(not p["finished_before_kill"] for p in report["points"])  # at least one real kill


def test_sigkill_inside_the_commit_step_serves_nothing_half_done_and_resumes(tmp_path):
    from giblet.synth import make_study

    config = make_study(tmp_path / "template", n_subjects=2, n_trs=16, shape=(9, 10, 8), movie=False,
                        annotations=False, seed=2, stages={"fmri": {"chunk_trs": 8}})
    report = kill_in_commit(config, tmp_path)
    assert set(report) == {"dropped", "moved", "recorded"}
