"""The small field MLP of notebook 03b."""

import pytest
import torch

from tutorial_lib.diffusion.parametrizations import x0_denoiser
from tutorial_lib.diffusion.samplers import sample_flow_euler
from tutorial_lib.diffusion.schedules import FLOW, time_grid
from tutorial_lib.models.mlp import FieldMLP, FieldMLPConfig


def test_shapes_config_and_a_number_for_t():
    model = FieldMLP(FieldMLPConfig(dim=3, hidden=16, depth=2, time_dim=8))
    x = torch.randn(5, 3)
    assert model(x, torch.rand(5)).shape == (5, 3)
    assert torch.equal(model(x, 0.3), model(x, torch.full((5,), 0.3)))
    assert len([m for m in model.net if isinstance(m, torch.nn.Linear)]) == 3
    with pytest.raises(ValueError, match="time_dim"):
        FieldMLPConfig(time_dim=7)


def test_it_depends_on_t_and_learns_a_field_that_samples_with_the_library():
    torch.manual_seed(0)
    model = FieldMLP(FieldMLPConfig(hidden=32, depth=2))
    x = torch.randn(4, 2)
    assert not torch.allclose(model(x, 0.1), model(x, 0.9))
    target = torch.tensor([2.0, -1.0])  # learn u = eps - x0 for data at one point: the field (x - x0) / t
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        eps, t = torch.randn(256, 2), torch.rand(256) * 0.9 + 0.1
        xt = (1 - t[:, None]) * target + t[:, None] * eps
        loss = ((model(xt, t) - (eps - target)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    with torch.no_grad():
        denoiser = x0_denoiser(model, "flow", FLOW)
        out = sample_flow_euler(denoiser, torch.randn(64, 2), time_grid(20, dtype=torch.float64))
    assert (out - target).norm(dim=1).mean() < 0.3
