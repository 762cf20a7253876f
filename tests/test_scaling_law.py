"""The frontier and the saturating power law of notebook 06's scaling study (eval/scaling_law.py)."""
import numpy as np
import pytest

from tutorial_lib.eval.scaling_law import compute_frontier, fit_saturating_power_law


def test_the_fit_recovers_a_known_law():
    compute = np.geomspace(1e11, 1e14, 9)
    loss = 0.3 + 40.0 * compute ** -0.2
    fit = fit_saturating_power_law(compute, loss)
    assert fit.E == pytest.approx(0.3, rel=1e-3)
    assert fit.alpha == pytest.approx(0.2, rel=1e-3)
    assert fit.A == pytest.approx(40.0, rel=1e-2)
    assert fit.rms < 1e-6 and fit.n == 9
    np.testing.assert_allclose(fit(3e14), 0.3 + 40.0 * 3e14 ** -0.2, rtol=1e-4)


def test_the_fit_is_least_squares_against_a_brute_force_search():
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e10, 1e13, 7)
    loss = 0.25 + 5.0 * compute ** -0.15 + rng.normal(0, 0.002, 7)
    fit = fit_saturating_power_law(compute, loss)
    sse = fit.rms ** 2 * len(loss)
    x = compute / compute.max()
    for alpha in np.linspace(0.02, 1.0, 200):  # for each alpha the best (E, A) >= 0 on a fine grid
        z = x ** -alpha
        for E in np.linspace(0, loss.min(), 200):
            A = max(0.0, float(z @ (loss - E) / (z @ z)))
            assert np.sum((loss - E - A * z) ** 2) >= sse - 1e-12


def test_a_pure_power_law_fits_with_no_floor():
    compute = np.geomspace(1e9, 1e12, 6)
    fit = fit_saturating_power_law(compute, 2.0 * compute ** -0.1)
    assert fit.E == pytest.approx(0.0, abs=1e-3)
    assert fit.alpha == pytest.approx(0.1, rel=1e-2)


def test_the_floor_is_never_negative():
    compute = np.geomspace(1e9, 1e12, 6)
    loss = 3.0 * compute ** -0.05 - 0.4  # a law that would need E < 0
    assert fit_saturating_power_law(compute, loss).E == 0.0


def test_the_frontier_keeps_the_lowest_loss_at_each_compute():
    compute = [1, 2, 2, 4, 8, 8, 16]
    loss = [0.9, 0.8, 0.7, 0.75, 0.6, 0.65, 0.61]
    # 0.8 at 2 loses to 0.7 at the same compute; 0.75 at 4 and 0.61 at 16 to cheaper runs; 0.65 at 8 to 0.6
    assert compute_frontier(compute, loss).tolist() == [0, 2, 4]


@pytest.mark.parametrize("compute, loss, message", [
    ([1, 2, 3], [0.5, 0.4], "one length"),
    ([1, 0, 3], [0.5, 0.4, 0.3], "positive"),
    ([1, 2, 3], [0.5, float("nan"), 0.3], "finite"),
])
def test_bad_points_are_refused(compute, loss, message):
    with pytest.raises(ValueError, match=message):
        compute_frontier(compute, loss)
    with pytest.raises(ValueError, match=message):
        fit_saturating_power_law(compute, loss)


def test_fewer_than_three_points_are_refused():
    with pytest.raises(ValueError, match="at least 3"):
        fit_saturating_power_law([1e9, 1e10], [0.5, 0.4])
