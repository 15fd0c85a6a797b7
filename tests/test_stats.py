"""guard.stats: thresholds set from clean scores."""

import numpy as np


def test_tail_threshold_extrapolates_only_past_what_the_scores_resolve():
    """On exponential scores the extrapolated 0.05% quantile lands near the true one (7.6) where 200 scores'
    maximum sits near their 0.5% quantile (5.3); a quantile the scores resolve is the empirical one."""
    from guard.stats import tail_threshold, upper_threshold

    rng = np.random.default_rng(0)
    got = [tail_threshold(rng.exponential(size=200), 0.0005) for _ in range(50)]
    assert 6.5 <= float(np.median(got)) <= 8.7
    maxima = [rng.exponential(size=200).max() for _ in range(50)]
    assert float(np.median(maxima)) < 6.5, "the maximum alone is the threshold the extrapolation replaces"
    s = rng.exponential(size=5000)
    assert tail_threshold(s, 0.01) == upper_threshold(s, 0.01)
    small = rng.exponential(size=10)
    assert tail_threshold(small, 0.0005) == upper_threshold(small, 0.0005)
