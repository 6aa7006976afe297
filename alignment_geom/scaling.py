"""Log–log slopes, the quartic onset window, fitted coefficients, collapse times and power-law fits.

API summary
    local_slope(ts, y) -> (T,) d log y / d log t
    onset_window(ts, y, target=4.0, tol=0.1, *, indices=False) -> (t_lo, t_hi)   (NaN, NaN) if none
    fit_coefficient(ts, y, window, power=4, method="intercept"|"series"|"mean") -> float   c of y ≈ c t^power
    collapse_time(ts, y, threshold) -> float   t* with y(t*) = threshold (log–log interpolation)
    power_law_fit(x, y, level=0.95) -> dict(exponent, exponent_ci, prefactor, prefactor_ci, r2, n)
    predicted_window(coeffs, target=4, tol=0.1) -> (t_lo, t_hi)   from Taylor coefficients a_k

These run on measured curves (numpy, float64) after the JAX computation; every function accepts
jax or numpy arrays and vectorises with ``np.vectorize``-style loops in user code. Points with
y ≤ 0 or non-finite y have no slope (NaN) and break windows.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["local_slope", "onset_window", "fit_coefficient", "collapse_time", "power_law_fit",
           "predicted_window"]


def _as_curve(ts, y):
    ts = np.asarray(ts, np.float64)
    y = np.asarray(y, np.float64)
    if ts.ndim != 1 or y.shape != ts.shape:
        raise ValueError(f"ts and y must be 1-D arrays of the same length; got {ts.shape} and {y.shape}")
    if ts.size and (np.any(~np.isfinite(ts)) or np.any(np.diff(ts) <= 0)):
        raise ValueError("ts must be finite and strictly increasing")
    return ts, y


def local_slope(ts, y) -> np.ndarray:
    """The local log–log slope s(t) = d log y / d log t at every grid point.

    Second-order finite differences in log t (``np.gradient`` on a non-uniform grid: central in
    the interior, one-sided at the ends). NaN wherever y (or a neighbour used) is ≤ 0 or not finite,
    and at t ≤ 0. For y = c tᵖ the result is exactly p.
    """
    ts, y = _as_curve(ts, y)
    out = np.full(ts.shape, np.nan)
    if ts.size < 2:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        lt = np.where(ts > 0, np.log(np.where(ts > 0, ts, 1.0)), np.nan)
        ly = np.where((y > 0) & np.isfinite(y), np.log(np.where(y > 0, y, 1.0)), np.nan)
        ok = np.isfinite(lt)
        if ok.sum() < 2:
            return out
        idx = np.nonzero(ok)[0]
        out[idx] = np.gradient(ly[idx], lt[idx])
    return out


def onset_window(ts, y, target: float = 4.0, tol: float = 0.1, *, indices: bool = False):
    """The longest run of consecutive grid points where |local_slope − target| ≤ tol.

    Returns (t_lo, t_hi), the first and last times of that run (ties: the earliest run), or
    (NaN, NaN) when no point qualifies; with ``indices=True`` the grid indices (i_lo, i_hi) of those
    points instead, or None. The window is a union of grid points: its ends are resolved to the grid
    spacing.
    """
    ts, y = _as_curve(ts, y)
    s = local_slope(ts, y)
    good = np.isfinite(s) & (np.abs(s - target) <= tol)
    best, best_len, i = None, 0, 0
    while i < good.size:
        if good[i]:
            j = i
            while j + 1 < good.size and good[j + 1]:
                j += 1
            if j - i + 1 > best_len:
                best, best_len = (i, j), j - i + 1
            i = j + 1
        else:
            i += 1
    if indices:
        return None if best is None else (int(best[0]), int(best[1]))
    if best is None:
        return (float("nan"), float("nan"))
    return (float(ts[best[0]]), float(ts[best[1]]))


def fit_coefficient(ts, y, window, power: float = 4, method: str = "intercept") -> float:
    """The coefficient c of y ≈ c t^power over the window [t_lo, t_hi] (inclusive).

    method="intercept" (default): least squares of log(y/t^p) = log c + β t over the window, i.e.
      y = c t^p (1 + β t + O(t²)), the form of a Taylor series Σ a_k t^k starting at k = p; returns
      exp(log c), the t → 0 limit (unbiased by the t^{p+1} term that bends the end of the window).
    method="series": weighted least squares of y/t^p = Σ_{j=−2}^{2} b_j (t/t_c)^j (t_c the window's
      geometric centre, weights 1/|y/t^p|: relative residuals); returns b_0. The t^{p−2}, t^{p−1}
      (ε-driven) and t^{p+1}, t^{p+2} (cubic-remainder) corrections are fitted along, so c is the t^p
      coefficient rather than a window average biased by them. Needs ≥ 8 points.
    method="mean": the geometric mean of y/t^p over the window (biased by the t^{p+1} term).
    Raises ValueError if the window is NaN or holds < 2 (intercept) / < 8 (series) / < 1 (mean) valid
    points.
    """
    ts, y = _as_curve(ts, y)
    lo, hi = window
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("window is empty (NaN): no onset window was found")
    sel = (ts >= lo) & (ts <= hi) & (y > 0) & np.isfinite(y)
    r = np.log(y[sel]) - power * np.log(ts[sel])
    if method == "mean":
        if r.size < 1:
            raise ValueError("no valid points in the window")
        return float(np.exp(np.mean(r)))
    if method == "series":
        if r.size < 8:
            raise ValueError(f"the series fit needs at least 8 valid points in the window; got {r.size}")
        t = ts[sel]
        q = y[sel] / t ** power
        x = t / np.sqrt(t[0] * t[-1])
        A = np.stack([x ** j for j in (-2, -1, 0, 1, 2)], axis=1)
        w = 1.0 / np.abs(q)
        coef, *_ = np.linalg.lstsq(A * w[:, None], q * w, rcond=None)
        return float(coef[2])
    if method == "intercept":
        if r.size < 2:
            raise ValueError("the intercept fit needs at least 2 valid points in the window")
        A = np.stack([np.ones(r.size), ts[sel]], axis=1)
        coef, *_ = np.linalg.lstsq(A, r, rcond=None)
        return float(np.exp(coef[0]))
    raise ValueError(f"method must be 'intercept', 'series' or 'mean'; got {method!r}")


def collapse_time(ts, y, threshold: float) -> float:
    """The first time t* at which y reaches ``threshold`` (> 0).

    Linear interpolation in (log t, log y) between the last point below and the first point at or
    above the threshold. Returns ts[0] if y[0] ≥ threshold, +inf if the threshold is never reached,
    NaN if the bracketing points are not positive/finite.
    """
    ts, y = _as_curve(ts, y)
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0; got {threshold}")
    above = np.nonzero(y >= threshold)[0]
    if above.size == 0:
        return float("inf")
    i = int(above[0])
    if i == 0:
        return float(ts[0])
    t0, t1, y0, y1 = ts[i - 1], ts[i], y[i - 1], y[i]
    if not (t0 > 0 and y0 > 0 and np.isfinite(y0) and np.isfinite(y1)):
        return float("nan")
    w = (np.log(threshold) - np.log(y0)) / (np.log(y1) - np.log(y0))
    return float(np.exp(np.log(t0) + w * (np.log(t1) - np.log(t0))))


def power_law_fit(x, y, level: float = 0.95) -> dict:
    """Fit y = A x^k by ordinary least squares on (log x, log y).

    Returns dict(exponent=k, exponent_ci=(lo, hi), prefactor=A, prefactor_ci=(lo, hi), r2, n,
    stderr): two-sided Student-t confidence intervals at ``level`` with n − 2 degrees of freedom
    (a zero-width interval when the data are an exact power law). Needs ≥ 3 points with x, y > 0
    (non-positive or non-finite points are dropped).
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same size; got {x.shape} and {y.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    n = lx.size
    if n < 3:
        raise ValueError(f"power_law_fit needs at least 3 positive points; got {n}")
    xm = lx.mean()
    sxx = np.sum((lx - xm) ** 2)
    if sxx == 0:
        raise ValueError("x must take at least two distinct values")
    k = np.sum((lx - xm) * (ly - ly.mean())) / sxx
    b = ly.mean() - k * xm
    resid = ly - (b + k * lx)
    sse = float(np.sum(resid ** 2))
    sst = float(np.sum((ly - ly.mean()) ** 2))
    s2 = sse / (n - 2)
    se_k = np.sqrt(s2 / sxx)
    se_b = np.sqrt(s2 * (1.0 / n + xm ** 2 / sxx))
    q = stats.t.ppf(0.5 + level / 2, n - 2)
    return {
        "exponent": float(k),
        "exponent_ci": (float(k - q * se_k), float(k + q * se_k)),
        "prefactor": float(np.exp(b)),
        "prefactor_ci": (float(np.exp(b - q * se_b)), float(np.exp(b + q * se_b))),
        "r2": 1.0 - sse / sst if sst > 0 else 1.0,
        "n": int(n),
        "stderr": float(se_k),
    }


def predicted_window(coeffs, target: int = 4, tol: float = 0.1):
    """The onset window predicted by the Taylor coefficients [a_0, …, a_{target+1}] of y(t).

    Lower end: for y ≈ a_{target−2} t^{target−2} + a_target t^target (the ε-regime, e.g. a_2 t² +
    a_4 t⁴), the slope reaches target − tol at t_lo = sqrt(a_{target−2}(2 − tol)/(tol · a_target))
    (= √19 · t_min for target 4, tol 0.1, a_2 = ε_F²/2, a_4 = γ_F²/8); 0 when a_{target−2} = 0.
    Upper end: for y ≈ a_target t^target (1 + r t), r = a_{target+1}/a_target, the slope moves by tol
    at t_hi = tol/|r| (first order in r t); inf when a_{target+1} = 0.
    """
    a = np.asarray(coeffs, np.float64)
    if a.size < target + 2:
        raise ValueError(f"need coefficients up to a_{target + 1}; got {a.size}")
    at = a[target]
    if not at > 0:
        return (float("nan"), float("nan"))
    lo_c = a[target - 2]
    t_lo = float(np.sqrt(lo_c * (2 - tol) / (tol * at))) if lo_c > 0 else 0.0
    r = a[target + 1] / at
    t_hi = float(tol / abs(r)) if r != 0 else float("inf")
    return (t_lo, t_hi)
