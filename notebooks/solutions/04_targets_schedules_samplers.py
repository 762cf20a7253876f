"""Worked solutions to notebook 04's exercises (run through their checks by tests/test_exercises.py)."""


def flow_to_eps(u, x_t, t):
    # x_t = (1 - t) x0 + t eps and x0 = eps - u give x_t = eps - (1 - t) u
    return x_t + (1 - t) * u


def min_snr_weight_v(alpha, sigma, gamma):
    snr = alpha**2 / sigma**2
    return snr.clamp(max=gamma) / ((alpha**2 + sigma**2) * (snr + 1))
