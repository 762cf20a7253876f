"""The 2-D toy data sets: seeded, the right shapes, on their shapes."""

import math

import torch

from tutorial_lib.data.toy2d import checkerboard, two_moons


def test_the_same_seed_gives_the_same_points_and_another_seed_others():
    for make in (two_moons, checkerboard):
        a, b, c = make(300, seed=1), make(300, seed=1), make(300, seed=2)
        assert a.shape == (300, 2) and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_moons_lie_on_their_two_arcs():
    x = two_moons(2000, seed=0, noise=0.0) / 1.5 + torch.tensor([0.5, 0.25])
    upper = (x.norm(dim=1) - 1).abs() < 1e-5  # on the unit circle, y >= 0
    lower = ((x - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() < 1e-5  # on the circle about (1, 1/2), y <= 1/2
    assert (upper | lower).all() and (x[upper, 1] >= -1e-6).all() and (x[lower, 1] <= 0.5 + 1e-6).all()
    assert 0.45 < upper.float().mean() < 0.55
    jittered = two_moons(2000, seed=0, noise=0.05)
    assert math.isclose((jittered - two_moons(2000, seed=0, noise=0.0)).std().item(), 0.05 * 1.5, rel_tol=0.1)


def test_the_checkerboard_fills_the_dark_squares_evenly():
    x = checkerboard(8000, seed=0)
    assert (x >= -2).all() and (x <= 2).all()
    cells = x.floor() + 2  # column, row in 0..3
    assert ((cells.sum(1) % 2) == 0).all()
    counts = torch.bincount((cells[:, 0] * 4 + cells[:, 1]).long(), minlength=16)
    assert (counts > 0).sum() == 8 and counts[counts > 0].min() > 800
