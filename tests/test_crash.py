"""Crash anywhere, every stage: a reduced number of seeded SIGKILL points (more by hand:
``python tests/crash_harness.py --kills 30``; results in docs/reliability.md)."""
from tests.crash_harness import harness, make_full_study


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    config = make_full_study(tmp_path / "template")
    report = harness(config, tmp_path, kills=3, seed=0)
    assert len(report["points"]) == 3
    assert any(not p["finished_before_kill"] for p in report["points"])  # at least one real kill
