"""The ``Problem`` value: one fine-tuning problem and one safety skill, as everything in alignment_geom sees them.

Notation (arXiv:2602.15799): θ* = ``params`` (the aligned parameters), L = ``loss_fn`` the fine-tuning loss on
``batch``, g = ∇L(θ*), H = ∇²L(θ*); the safety skill S is a softmax policy π_θ(·|x) = softmax(z(θ, x)) with
logits z = ``logits_fn(θ, inputs)`` (its Fisher F = mean Jᵀ(diag p − ppᵀ)J is the true Fisher), and/or the
per-example log-likelihoods log π_θ(yᵢ|xᵢ) = ``logprob_fn(θ, safety_batch)`` of safe completions (their
empirical Fisher F̂ = (1/m) Σᵢ ∇log πᵢ ∇log πᵢᵀ, and the paper's random-subspace estimate of it).
``mask`` (a boolean pytree like θ) restricts every quantity to a parameter block S (H_SS, F_SS, θ̇_S = −∇_S L).

Shapes: ``loss_fn(params, batch) -> ()``, ``logits_fn(params, inputs) -> (..., C)`` (every leading axis is
averaged over in the Fisher and in Δu), ``logprob_fn(params, safety_batch) -> (m,)`` (every leaf of
``safety_batch`` has the example axis first).

A Problem is a pytree: the arrays (params, batch, inputs, safety_batch) are its children; the functions,
``name`` and the ``mask`` (compared by value) are its static part. ``name`` is a label that never takes part
in the comparison, so ``jax.jit(f)(problem)`` compiles once per set of functions, mask and array shapes
(problems that differ only in their names share one compiled program), sees the mask concretely, and
``jax.vmap`` maps over a stack of problems. It is immutable; :meth:`Problem.replace` returns a modified copy
(e.g. a new θ).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

from alignment_geom.tree import StaticTree, check_mask

__all__ = ["Problem"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Problem:
    """A fine-tuning loss at θ* and the safety skill whose alignment it may break.

    Fields: ``params`` θ*; ``loss_fn`` L(θ, batch); ``batch``; ``logits_fn`` z(θ, inputs) of the safety
    policy and its ``inputs`` (for the true Fisher F and Δu = KL(π_θ* ‖ π_θ)); ``logprob_fn`` and
    ``safety_batch`` (per-example log π(safe completion | prompt), for the empirical Fisher F̂); ``mask``
    (boolean pytree: the parameter block S); ``name`` (a label, static).
    """

    params: PyTree
    loss_fn: Optional[Callable] = None
    batch: Any = None
    logits_fn: Optional[Callable] = None
    inputs: Any = None
    logprob_fn: Optional[Callable] = None
    safety_batch: Any = None
    mask: Optional[PyTree] = None
    name: str = ""

    def replace(self, **changes) -> "Problem":
        """A copy with the given fields replaced (``problem.replace(params=theta)``)."""
        return dataclasses.replace(self, **changes)

    def require(self, *fields: str) -> "Problem":
        """Return self after checking the mask, or raise ValueError naming the first of ``fields`` that is None."""
        for f in fields:
            if getattr(self, f) is None:
                raise ValueError(f"this measurement needs Problem.{f}, which is None")
        check_mask(self.mask, self.params)
        return self


_DATA = ("params", "batch", "inputs", "safety_batch")
_META = ("loss_fn", "logits_fn", "logprob_fn", "name")


class _Label(str):
    """A name in a pytree's static part that compares equal to every other label (jit caches ignore it)."""

    def __eq__(self, other):
        return isinstance(other, _Label)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return 0


def _flatten(p: Problem):
    children = tuple(getattr(p, f) for f in _DATA)
    aux = tuple(getattr(p, f) for f in _META[:-1]) + (_Label(p.name), StaticTree(p.mask))
    return children, aux


def _unflatten(aux, children):
    kw = dict(zip(_DATA, children))
    kw.update(zip(_META, aux[:-1]))
    kw["name"] = str(aux[-2])
    return Problem(mask=aux[-1].tree, **kw)


jax.tree_util.register_pytree_node(Problem, _flatten, _unflatten)
