"""benchmarks.replication: its statistics, its teacher sanity check, and the smallest
configuration end to end (every method, two seeds, tiny models, in one process)."""
import json
import math
import os

import pytest

from benchmarks import replication


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, -4.0])
def test_t_p_value_matches_scipy(t, df):
    stats = pytest.importorskip("scipy.stats")
    assert replication.t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)


def test_t_p_value_known_points():
    assert replication.t_two_sided_p(4.302652729, 2) == pytest.approx(0.05, abs=1e-8)   # t table, df=2
    assert replication.t_two_sided_p(12.70620474, 1) == pytest.approx(0.05, abs=1e-8)
    assert math.isnan(replication.t_two_sided_p(1.0, 0))


def test_paired_test_over_seeds():
    test = replication.paired({1: 1.0, 2: 2.0, 3: 3.5}, {1: 1.5, 2: 2.4, 3: 3.6, 4: 9.0})
    assert test["n"] == 3 and test["deltas"] == pytest.approx([-0.5, -0.4, -0.1])
    assert test["delta"] == pytest.approx(-1 / 3) and test["better_seeds"] == 3
    assert 0 < test["p"] < 0.2


def test_teacher_check_rejects_a_teacher_that_is_not_clearly_better():
    student = {"bits_per_byte": 2.00, "bits_per_byte_se": 0.01}
    assert replication.teacher_check({"bits_per_byte": 1.70, "bits_per_byte_se": 0.01}, student, "shared") is None
    for weak in (1.98, 2.10):  # a 1% gap, a worse teacher
        assert "not clearly better" in replication.teacher_check(
            {"bits_per_byte": weak, "bits_per_byte_se": 0.01}, student, "shared")
    noisy = {"bits_per_byte": 1.85, "bits_per_byte_se": 0.1}  # 7.5% better but within 3 standard errors
    assert replication.teacher_check(noisy, student, "cross") is not None


def test_smallest_configuration_end_to_end(tmp_path):
    prefix = str(tmp_path / "result")
    args = ["--preset", "smoke", "--in-process", "--work-dir", str(tmp_path / "work"), "--results", prefix]
    report = replication.main(args + ["--allow-weak-teacher"])
    names = [m.name for m in replication.METHODS]
    assert [row["method"] for row in report["rows"]] == names
    assert all(row["seeds"] == [1, 2] and row["bits_per_byte"] > 0 for row in report["rows"])
    assert all(row["vs_ce"]["n"] == 2 for row in report["rows"][1:])
    assert all([step for step, _ in report["curves"][name]] == [1, 2] for name in names)  # tide.train --eval-data
    with open(prefix + ".json") as fh:
        assert json.load(fh)["corpus"]["heldout"]["list_sha256"] == report["corpus"]["heldout"]["list_sha256"]
    with open(prefix + ".md") as fh:
        table = fh.read()
    assert all(f"| {name} |" in table for name in names) and "SMOKE" in table
    assert "Teacher sanity check failed" in table  # three-step teachers are not better: said, not hidden
    assert os.path.getsize(prefix + ".png") > 0
    # without --allow-weak-teacher the same run stops loudly (teachers and start come from the cache)
    with pytest.raises(SystemExit, match="TEACHER SANITY CHECK FAILED"):
        replication.main(args)
