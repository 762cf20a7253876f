"""Worked solutions to notebook 01's exercises (run through their checks by tests/test_exercises.py)."""


def ddim_step_from_scratch(x_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s):
    eps_hat = (x_t - alpha_t * x0_hat) / sigma_t  # the noise the prediction implies
    return alpha_s * x0_hat + sigma_s * eps_hat  # the same x0 and noise, at the lower level s


def guided(conditional, unconditional, w):
    return unconditional + w * (conditional - unconditional)
