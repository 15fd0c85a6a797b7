"""The bench's screening over seeds: the rates are read from each seed's verdicts, and a scan row carries the
isolation and the target's screening rank that the rates are judged by."""

import numpy as np
import pytest

from guard.bench.nc_speed import scan_seconds_by_classes, screening_rates


def _row(backdoored: list[int], clean: list[int]) -> dict:
    return {"backdoored": {"suspect_labels": backdoored, "target": 6}, "clean": {"suspect_labels": clean}}


def test_rates_count_a_seed_right_only_when_both_sides_are():
    rows = {"0": _row([6], []), "1": _row([6, 11], []), "2": _row([], []), "3": _row([6], [19])}
    rates = screening_rates(rows)
    assert rates == {"seeds": 4, "target_flagged_alone": 0.5, "clean_twin_quiet": 0.75, "right_on_both_sides": 0.25}
    with pytest.raises(ValueError):
        screening_rates({})


def test_a_screened_scan_row_reports_isolation_and_the_targets_rank(tmp_path):
    out = scan_seconds_by_classes(tmp_path, classes=(100,), seed=0, n_train=600, epochs=1, n_clean=200,
                                  clean_twins_above=100, max_rounds=2, screen_steps=4, screen_tail=2)
    row = out["by_classes"]["100"]["backdoored"]
    assert row["labels_optimised"] == 15 and len(row["candidates"]) == 5 and row["target"] == 6
    assert set(row["isolation"]) == set(row["max_anomaly_index"])
    assert all(v is None or v > 0 for v in row["isolation"].values())
    rank = row["target_screening_rank"]
    assert rank is None or 1 <= rank <= 20
    assert np.isfinite(row["seconds"]) and "clean" not in out["by_classes"]["100"]
