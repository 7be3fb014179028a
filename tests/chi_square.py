"""Chi-square goodness-of-fit helpers of the sampling tests (engine, batch, draft policy, ops)."""
from __future__ import annotations

import math

import torch


def chi_square_limit(dof: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(dof) at normal score z (Wilson-Hilferty approximation); z = 3.09 is the 99.9%
    quantile, z = 4.75 about 1 - 1e-6."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(observed: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic of counts observed [V] against probabilities probs [V]: bins expected at least
    min_expected times on their own, the rest merged into one bin. -> (statistic, degrees of freedom)."""
    expected = probs.double() * observed.sum()
    big = expected >= min_expected
    obs = torch.cat([observed[big].double(), observed[~big].sum()[None].double()])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def two_sample_chi_square(a: torch.Tensor, b: torch.Tensor, min_count: int = 10) -> tuple[float, int]:
    """Statistic of two count vectors [V] of equal sample size coming from one distribution: bins with fewer than
    min_count counts together merged into one. -> (statistic, degrees of freedom)."""
    big = (a + b) >= min_count
    a = torch.cat([a[big], a[~big].sum()[None]]).double()
    b = torch.cat([b[big], b[~big].sum()[None]]).double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    return float(((a - b) ** 2 / (a + b)).sum()), int(keep.sum()) - 1


def chi2_statistic(observed: dict, expected_probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic of counts per outcome (dicts) from n draws against their probabilities, outcomes expected
    fewer than 5 times pooled into one; -> (stat, df)."""
    stat, df = 0.0, -1
    pool_obs, pool_exp = 0, 0.0
    for key, p in expected_probs.items():
        exp = p * n
        if exp < 5:
            pool_obs += observed.get(key, 0)
            pool_exp += exp
            continue
        stat += (observed.get(key, 0) - exp) ** 2 / exp
        df += 1
    assert all(k in expected_probs for k in observed), "an outcome of probability 0 was drawn"
    if pool_exp >= 5:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        df += 1
    return stat, df
