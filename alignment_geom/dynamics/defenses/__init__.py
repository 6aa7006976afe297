"""Defences of the sensitive subspace during fine-tuning: optax transformations, their gradient-flow velocities,
and one registry by name (docs/paper_notes.md §4 and §7; figure 7 and the defences landscape study).

Each defence is an ``optax.GradientTransformation`` that maps the update g (the fine-tuning gradient when it comes
first in the chain) to a defended update g̃, under jit, with masks (the :class:`~alignment_geom.problem.Problem`'s
mask: LoRA adapters, a block of layers; frozen leaves pass unchanged) and with sharded parameters:

    static_projection(basis)                          g̃ = (I − P(θ*)) g
    dynamic_projection(problem, d, every=K, estimator=…, warm=True)
                                                      g̃ = (I − P(θ_r)) g, P re-estimated every K steps
    fisher_penalty(problem, strength, subspace=None)  g̃ = g + λ_reg F(θ*)(θ − θ*)
    utility_penalty(problem, strength)                g̃ = g + λ_reg ∇Δu(θ)          (the exact-Δu variant)
    coupling_suppression(problem, basis)              g̃ = g − P H(θ*)(θ − θ*)      (one HVP per step)

Use: ``tx = optax.chain(make_defense("fisher_penalty", problem, subspace, strength=10.0), optax.adam(1e-4))``,
``updates, state = tx.update(grads, state, params)``. Transformations needing θ take it as ``params``.

Gradient flows: ``flow_velocity(tx)`` is the velocity θ̇ = −T_θ(∇L(θ)) for ``gradient_flow``/``discrete_path``;
gradient descent through ``optax.chain(tx, optax.sgd(η))`` is its Euler discretisation on the clock t = η k.
The velocity hooks of figure 7, ``projection_defense`` and ``dynamic_projection_defense``, are the flows of the
static and the (K → 0) dynamic projection.

    hooks       projection_defense, dynamic_projection_defense, flow_velocity
    projection  static_projection, dynamic_projection, DynamicProjectionState, estimate_subspace, refresh_cost
    penalty     fisher_penalty, utility_penalty
    coupling    coupling_suppression
    registry    DEFENSES, ESTIMATORS, make_defense, register_defense, fisher_estimator
"""
from alignment_geom.dynamics.defenses.coupling import coupling_suppression
from alignment_geom.dynamics.defenses.hooks import dynamic_projection_defense, flow_velocity, projection_defense
from alignment_geom.dynamics.defenses.penalty import fisher_penalty, utility_penalty
from alignment_geom.dynamics.defenses.projection import (
    DynamicProjectionState,
    dynamic_projection,
    estimate_subspace,
    refresh_cost,
    static_projection,
)
from alignment_geom.dynamics.defenses.registry import (
    DEFENSES,
    ESTIMATORS,
    fisher_estimator,
    make_defense,
    register_defense,
)

__all__ = [
    "projection_defense", "dynamic_projection_defense", "flow_velocity",
    "static_projection", "dynamic_projection", "DynamicProjectionState", "estimate_subspace", "refresh_cost",
    "fisher_penalty", "utility_penalty", "coupling_suppression",
    "DEFENSES", "ESTIMATORS", "make_defense", "register_defense", "fisher_estimator",
]
