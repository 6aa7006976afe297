"""The registry of defences by name, so that configs can sweep them.

    DEFENSES                          name -> builder(problem, subspace, **options) -> optax transformation
    make_defense(name, problem, subspace, **options)
    register_defense(name, builder)   add a defence (one small module with one builder function)
    fisher_estimator(name, **options) an aic Fisher estimator from its config name (dynamic_projection)

Every builder takes the same two arguments: ``problem`` (θ* = ``problem.params``, the fine-tuning loss, the
safety skill, the mask) and ``subspace`` (the :class:`~alignment_geom.aic.SensitiveSubspace` at θ*: top-d basis
and eigenvalues), then its own keyword options:

    none                  —
    static_projection     —
    dynamic_projection    every (K, steps), estimator (a name of :data:`ESTIMATORS` or an estimator), warm,
                          num_steps, tol, max_iters, oversample, key, sketch_dim
    fisher_penalty        strength (λ_reg), fisher ("exact": F(θ*) products; "subspace": Σ_j λ_j u_j u_jᵀ)
    utility_penalty       strength (λ_reg)
    coupling_suppression  —
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict

import optax

from alignment_geom.aic import EmpiricalFisher, RandomSubspace, SensitiveSubspace, TrueFisher
from alignment_geom.dynamics.defenses.coupling import coupling_suppression
from alignment_geom.dynamics.defenses.penalty import fisher_penalty, utility_penalty
from alignment_geom.dynamics.defenses.projection import dynamic_projection, static_projection
from alignment_geom.problem import Problem

__all__ = ["DEFENSES", "ESTIMATORS", "make_defense", "register_defense", "fisher_estimator"]

ESTIMATORS: Dict[str, Callable] = {
    "factor": lambda **kw: TrueFisher("factor"),
    "lanczos": lambda tol=None, num_steps=None, **kw: TrueFisher("lanczos", tol=tol, num_steps=num_steps),
    "randomized": lambda tol=None, num_steps=None, **kw: TrueFisher("randomized", tol=tol, num_steps=num_steps),
    "empirical_lanczos": lambda tol=None, num_steps=None, **kw: EmpiricalFisher("lanczos", tol=tol,
                                                                                num_steps=num_steps),
    "gram": lambda **kw: EmpiricalFisher("gram"),
    "random_subspace": lambda sketch_dim=4096, **kw: RandomSubspace(int(sketch_dim)),
}


def fisher_estimator(name: str, **options):
    """The estimator called ``name`` in :data:`ESTIMATORS` (options: tol, num_steps, sketch_dim)."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is not allowed: one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](**options)


def _none(problem, subspace):
    return optax.identity()


def _static(problem, subspace):
    return static_projection(subspace)


def _dynamic(problem, subspace, *, every=1, estimator="lanczos", warm=True, num_steps=None, tol=None, max_iters=None,
             oversample=10, key=None, sketch_dim=4096):
    est = fisher_estimator(estimator, tol=tol, num_steps=num_steps, sketch_dim=sketch_dim) if isinstance(
        estimator, str) else estimator
    return dynamic_projection(problem, int(subspace.eigvals.shape[-1]), every=every, estimator=est, warm=warm,
                              max_iters=max_iters, oversample=oversample, key=key)


def _fisher(problem, subspace, *, strength=1.0, fisher="exact"):
    if fisher not in ("exact", "subspace"):
        raise ValueError(f"fisher={fisher!r} is not allowed: 'exact' (F(θ*) products) or 'subspace' (top-d)")
    return fisher_penalty(problem, strength, subspace=subspace if fisher == "subspace" else None)


def _utility(problem, subspace, *, strength=1.0):
    return utility_penalty(problem, strength)


def _coupling(problem, subspace):
    return coupling_suppression(problem, subspace)


DEFENSES: Dict[str, Callable] = {
    "none": _none,
    "static_projection": _static,
    "dynamic_projection": _dynamic,
    "fisher_penalty": _fisher,
    "utility_penalty": _utility,
    "coupling_suppression": _coupling,
}


def register_defense(name: str, builder: Callable) -> None:
    """Add ``builder(problem, subspace, **options) -> optax.GradientTransformation`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a defence name must be a non-empty string; got {name!r}")
    if name in DEFENSES:
        raise ValueError(f"a defence named {name!r} is already registered")
    DEFENSES[name] = builder


def make_defense(name: str, problem: Problem, subspace: SensitiveSubspace, **options) -> optax.GradientTransformation:
    """The defence registered as ``name``, built for ``problem`` and the sensitive ``subspace`` at θ*.

    Raises ValueError naming the allowed defences, or the defence's allowed options, on bad input.
    """
    if name not in DEFENSES:
        raise ValueError(f"defense={name!r} is not allowed: one of {', '.join(DEFENSES)}")
    builder = DEFENSES[name]
    allowed = [p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"defense {name!r}: option {bad[0]!r} is not allowed: "
                         + (", ".join(allowed) if allowed else "this defence takes no options"))
    return builder(problem, subspace, **options)
