"""Every sampler, against exact answers and against diffusers' schedulers.

For Gaussian data x0 ~ N(M, S^2) (per dimension) the optimal denoiser is known in closed form,
    E[x0 | x_t] = M + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha M),
and so is the probability-flow ODE's map from x_t to the data: it keeps the standardised value
(x_t - alpha M) / sqrt(alpha^2 S^2 + sigma^2), so x0 = M + S (x_T - alpha_T M) / sqrt(...). A
correct sampler fed this denoiser returns samples with mean M and std S, and a deterministic one
converges to that map at its order.
"""

from __future__ import annotations

import pytest
import torch

from tutorial_lib.diffusion.parametrizations import prediction_target
from tutorial_lib.diffusion.samplers import (SAMPLERS, SIGMA_SAMPLERS, _randn, default_sampler, sample_ddim,
                                             sample_ddpm, sample_dpmpp_2m, sample_euler, sample_flow_euler,
                                             sample_heun, samplers_for)
from tutorial_lib.diffusion.schedules import COSINE, FLOW, get_schedule, shift_timesteps, time_grid

M = torch.tensor([1.5, -0.5, 2.0, 0.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0, 0.7], dtype=torch.float64)
SCALED_LINEAR = get_schedule("scaled_linear")
STOCHASTIC = {"ddpm": {}, "ddim": {"eta": 1.0}}


def optimal_x0(x, alpha, sigma):
    return M + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * M)


def gaussian_denoiser(schedule):
    def denoiser(x, t, cond=None):
        return optimal_x0(x, *schedule.alpha_sigma_like(t, x))

    return denoiser


def marginal(noise, schedule, t):
    """x_t ~ N(alpha M, alpha^2 S^2 + sigma^2) from standard normal noise: where a sampler starts."""
    alpha, sigma = schedule.alpha_sigma(t)
    return alpha * M + (alpha**2 * S**2 + sigma**2).sqrt() * noise


def normal(n, seed=0):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(name, schedule, ts, x, seed=1, **kwargs):
    extra = {"generator": torch.Generator().manual_seed(seed)} if name in ("ddpm", "ddim") else {}
    return SAMPLERS[name](gaussian_denoiser(schedule), x, ts, schedule=schedule, **extra, **kwargs)


# ----------------------------------------------------------------------------- exactness
ZTSNR = get_schedule("scaled_linear", zero_terminal_snr=True)
# (sampler, schedule, steps, options, std tolerance): ancestral samplers lose about 3% of the std at
# 100 steps (each step's fixed posterior variance leaves out the uncertainty of x0_hat), first-order
# ODE samplers 1.5%, second-order ones at 25 steps 1.3%; the std's standard error adds 0.5%.
CASES = [("ddpm", COSINE, 100, {}, 0.05), ("ddim", COSINE, 100, {"eta": 1.0}, 0.05),
         ("ddim", COSINE, 100, {}, 0.025), ("heun", COSINE, 25, {}, 0.025),
         ("dpmpp_2m", COSINE, 25, {}, 0.025), ("flow_euler", FLOW, 100, {}, 0.025),
         ("dpmpp_2m", ZTSNR, 100, {}, 0.025)]


@pytest.mark.parametrize("name, schedule, steps, kwargs, std_rtol", CASES,
                         ids=[f"{c[0]}{'-eta1' if c[3] else ''}-{c[1].name}" for c in CASES])
def test_samplers_recover_gaussian_data(name, schedule, steps, kwargs, std_rtol):
    """20,000 samples from the exact marginal at t = 1: mean within 4 standard errors (S / 141)
    plus 0.01 S, std within `std_rtol` (see CASES)."""
    n = 20_000
    ts = schedule.grid(steps)
    x = run(name, schedule, ts, marginal(normal(n), schedule, ts[0]), **kwargs)
    assert ((x.mean(0) - M).abs() <= 4 * S / n**0.5 + 0.01 * S).all(), x.mean(0)
    torch.testing.assert_close(x.std(0), S, rtol=std_rtol, atol=0)


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_to_the_exact_map_at_their_order(name, order):
    """Max error against the exact ODE map, from t = 0.98 (sigma / alpha = 32) on the cosine
    schedule, at 20, 40 and 80 steps: doubling the steps divides it by about 2^order (> 1.8 for
    Euler, > 3 for the 2nd-order ones, which are near 3.5 to 5 here)."""
    noise = normal(500)
    x = marginal(noise, COSINE, torch.tensor(0.98, dtype=torch.float64))
    exact = M + S * noise
    errors = [(run(name, COSINE, COSINE.grid(n, t_max=0.98), x) - exact).abs().max().item()
              for n in (20, 40, 80)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(1.8 < r < 2.2 for r in ratios) if order == 1 else all(r > 3 for r in ratios), (errors, ratios)


def test_equivalences():
    """DDIM with eta = 0 is Euler's method, and on the flow path it is flow Euler; DDPM is DDIM
    with eta = 1 (the same draws from the same generator)."""
    ts = COSINE.grid(10)
    x = normal(100)
    assert torch.equal(run("euler", COSINE, ts, x), run("ddim", COSINE, ts, x))
    torch.testing.assert_close(run("flow_euler", FLOW, FLOW.grid(10), x), run("ddim", FLOW, FLOW.grid(10), x))
    torch.testing.assert_close(run("ddpm", COSINE, ts, x), run("ddim", COSINE, ts, x, eta=1.0))


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", SAMPLERS)
def test_never_evaluates_t_zero_and_calls_back_every_step(name):
    schedule = FLOW if name == "flow_euler" else COSINE
    seen, calls = [], []

    def denoiser(x, t, cond):
        assert t.shape == (x.shape[0],) and cond == "c"
        seen.append(float(t[0]))
        return optimal_x0(x, *schedule.alpha_sigma_like(t, x))

    extra = {"generator": torch.Generator().manual_seed(0)} if name in STOCHASTIC else {}
    out = SAMPLERS[name](denoiser, normal(3), schedule.grid(5), "c", lambda i, t, x, x0: calls.append(i),
                         schedule=schedule, **extra)
    assert min(seen) > 0 and torch.isfinite(out).all()
    assert calls == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "flow_euler"])
def test_finite_from_zero_terminal_snr(name):
    """Where alpha(1) = 0 exactly, k-diffusion's z = x / alpha and s = sigma / alpha are infinite;
    the updates here, written in x, stay finite."""
    assert torch.isfinite(run(name, ZTSNR, ZTSNR.grid(10), normal(50))).all()


def test_ends_at_t_min_without_denoising():
    ts = COSINE.grid(4, t_min=0.2)
    x0_hats = []
    out = sample_ddim(gaussian_denoiser(COSINE), normal(10), ts,
                      callback=lambda i, t, x, x0: x0_hats.append(x0))
    assert len(x0_hats) == 4 and not torch.allclose(out, x0_hats[-1])


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm, sample_euler, sample_heun, sample_dpmpp_2m])
def test_bad_grids(sampler):
    for ts, match in ((torch.tensor([0.0, 0.5, 1.0]), "decrease strictly"),
                      (torch.tensor([1.0, 0.5, 0.5]), "decrease strictly"),
                      (torch.tensor([1.0]), "at least 2"), (torch.ones(2, 2), "1-D"),
                      (torch.tensor([1.5, 0.0]), r"in \[0, 1\]"),
                      (torch.tensor([1.0, -0.5]), r"in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            sampler(gaussian_denoiser(COSINE), normal(2), ts)


def test_flow_euler_needs_the_flow_path():
    with pytest.raises(ValueError, match="flow path"):
        sample_flow_euler(gaussian_denoiser(COSINE), normal(2), COSINE.grid(4), schedule=COSINE)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_are_seeded(name):
    ts, x = COSINE.grid(10), normal(50)
    assert torch.equal(run(name, COSINE, ts, x, seed=1, **STOCHASTIC[name]),
                       run(name, COSINE, ts, x, seed=1, **STOCHASTIC[name]))
    assert not torch.equal(run(name, COSINE, ts, x, seed=1, **STOCHASTIC[name]),
                           run(name, COSINE, ts, x, seed=2, **STOCHASTIC[name]))


def test_noise_is_drawn_on_the_generators_device():
    """A generator draws on its own device only: the pipeline's CPU generator with CUDA latents. The
    draw happens there, then moves, so a seed gives the same noise wherever x lives. The meta device
    stands in for CUDA here (it has no values: the CPU generator advancing by one draw shows where
    the draw happened); test_stochastic_samplers_on_cuda checks the values on a GPU."""
    g = torch.Generator().manual_seed(0)
    z = _randn(torch.empty(3, 4, device="meta", dtype=torch.float64), g)
    assert z.device.type == "meta" and z.shape == (3, 4) and z.dtype == torch.float64
    reference = torch.Generator().manual_seed(0)
    torch.randn(3, 4, generator=reference, dtype=torch.float64)
    assert torch.equal(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=reference))
    x = normal(5)
    assert torch.equal(_randn(x, torch.Generator().manual_seed(1)),
                       torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_on_cuda(name):
    """A CPU generator drives CUDA latents with the CPU's draws; a CUDA generator works too. The
    Gaussian denoiser runs on the CPU, the sampler's state and draws on the GPU."""
    x = _randn(torch.empty(2, 4, device="cuda"), torch.Generator().manual_seed(3))
    assert x.device.type == "cuda"
    assert torch.equal(x.cpu(), torch.randn(2, 4, generator=torch.Generator().manual_seed(3)))

    def denoiser(x, t, cond=None):
        return gaussian_denoiser(COSINE)(x.cpu(), t.cpu(), cond).to(x.device)

    ts, noise = COSINE.grid(10), normal(50)
    on_cpu = run(name, COSINE, ts, noise, seed=1, **STOCHASTIC[name])
    on_gpu = SAMPLERS[name](denoiser, noise.cuda(), ts, schedule=COSINE,
                            generator=torch.Generator().manual_seed(1), **STOCHASTIC[name])
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)  # float64 on both: the same draws, the same chain
    cuda_generator = torch.Generator("cuda").manual_seed(1)
    out = SAMPLERS[name](denoiser, noise.cuda(), ts, schedule=COSINE, generator=cuda_generator,
                         **STOCHASTIC[name])
    assert out.device.type == "cuda" and torch.isfinite(out).all()


def test_every_schedule_has_samplers_and_a_default_among_them():
    """Flow Euler steps the flow path alone; every other sampler, the sigma-space ones included,
    steps every schedule. An EDM model defaults to EDM's Heun on any."""
    for schedule in (COSINE, FLOW, SCALED_LINEAR, ZTSNR, get_schedule("linear")):
        for prediction in (None, "x0", "eps", "v", "flow", "edm"):
            assert default_sampler(schedule, prediction) in samplers_for(schedule)
        every = set(SAMPLERS) | set(SIGMA_SAMPLERS)
        assert set(samplers_for(schedule)) == (every if schedule is FLOW else every - {"flow_euler"})
        assert default_sampler(schedule, "edm") == "edm_heun"
    assert default_sampler(FLOW) == "flow_euler" and default_sampler(COSINE) == "ddim"
    assert default_sampler(FLOW, "flow") == "flow_euler" and default_sampler(COSINE, "v") == "ddim"


def test_float32_grid_and_state():
    """The pipeline's case: float32 levels and latents. There cos(pi / 2) = -4e-8, and the samplers
    must still agree with the float64 run."""
    def denoiser(x, t, cond):
        return gaussian_denoiser(COSINE)(x, t, cond).float()

    x = normal(8)
    for name in ("heun", "dpmpp_2m"):
        out = SAMPLERS[name](denoiser, x.float(), time_grid(10))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, run(name, COSINE, COSINE.grid(10), x).float(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- diffusers
DIFFUSERS_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
XCHECK = [("DDPMScheduler", "ddpm", "epsilon", {}), ("DDIMScheduler", "ddim", "epsilon", {}),
          ("DDIMScheduler", "ddim", "v_prediction", {}), ("DDIMScheduler", "ddim", "sample", {}),
          ("DDIMScheduler", "ddim", "epsilon", {"eta": 1.0}),
          ("EulerDiscreteScheduler", "euler", "epsilon", {}),
          ("HeunDiscreteScheduler", "heun", "epsilon", {}),
          ("DPMSolverMultistepScheduler", "dpmpp_2m", "epsilon", {})]
SCHEDULER_OPTIONS = {"DDPMScheduler": {"clip_sample": False}, "DDIMScheduler": {"clip_sample": False},
                     "DPMSolverMultistepScheduler": {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                     "final_sigmas_type": "zero"}}


@pytest.mark.parametrize("scheduler_name, name, prediction, kwargs", XCHECK,
                         ids=[f"{c[0]}-{c[2]}{'-eta1' if c[3] else ''}" for c in XCHECK])
def test_agrees_with_diffusers(scheduler_name, name, prediction, kwargs):
    """Stable Diffusion's scaled-linear betas, 10 "trailing" steps (our `Schedule.grid`), the
    Gaussian-optimal model giving diffusers its `prediction` (alpha, sigma read off diffusers' own
    alphas_cumprod), the same start x_1 and, for the stochastic ones, the same generator seed (both
    draw torch.randn of the sample's shape once per step, in order). Euler and Heun step
    k-diffusion's z = x / alpha, so they start from x_1 / alpha_1 and end on z_0 = x_0.
    Tolerance: atol = rtol = 1e-5; diffusers keeps its tables (and Euler its arithmetic) in float32,
    ours in float64, and they differ by about 2e-6 here."""
    diffusers = pytest.importorskip("diffusers")
    steps, n_train = 10, 1000
    scheduler = getattr(diffusers, scheduler_name)(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
        prediction_type=prediction, **SCHEDULER_OPTIONS.get(scheduler_name, {}))
    scheduler.set_timesteps(steps)
    ts = SCALED_LINEAR.grid(steps)
    levels = (scheduler.timesteps.unique_consecutive().double() + 1) / n_train  # Heun repeats them
    assert torch.equal(torch.cat([levels, ts[-1:]]), ts)

    x_1 = normal(64)
    ve = name in ("euler", "heun")
    x = x_1 * (1 + scheduler.sigmas[0].double() ** 2) ** 0.5 if ve else x_1.clone()
    generator = torch.Generator().manual_seed(5)
    for timestep in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, timestep)
        alpha_bar = scheduler.alphas_cumprod[int(timestep)].double()
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = optimal_x0(x_in, alpha, sigma)
        output = prediction_target(DIFFUSERS_KINDS[prediction], x0, (x_in - alpha * x0) / sigma, alpha, sigma)
        x = scheduler.step(output, timestep, x, **({"generator": generator} if name in STOCHASTIC else {}),
                           **kwargs).prev_sample
    ours = run(name, SCALED_LINEAR, ts, x_1, seed=5, **kwargs)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_flow_euler_agrees_with_diffusers():
    """FlowMatchEulerDiscreteScheduler with shift 3 on 10 steps; our grid is the same shifted
    levels (`shift_timesteps`), the model the Gaussian-optimal velocity u = (x_t - x0_hat) / t.
    Tolerance as above (diffusers' sigmas are float32)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = time_grid(10, dtype=torch.float64)
    scheduler.set_timesteps(sigmas=plain[:-1].numpy())
    ts = shift_timesteps(plain, 3.0)
    torch.testing.assert_close(scheduler.sigmas.double(), ts, atol=1e-6, rtol=0)

    x_1 = normal(64)
    x = x_1.clone()
    for timestep in scheduler.timesteps:
        t = timestep.double() / 1000
        x = scheduler.step((x - optimal_x0(x, 1 - t, t)) / t, timestep, x).prev_sample
    torch.testing.assert_close(sample_flow_euler(gaussian_denoiser(FLOW), x_1, ts), x, atol=1e-5, rtol=1e-5)
