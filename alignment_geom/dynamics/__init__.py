"""Training dynamics from θ*: gradient flow, discrete optimiser paths, defences and path recorders (paper §4, §6).

    flow      gradient_flow (dopri5 or RK4 in lax control flow)
    paths     discrete_path (GD/SGD/Adam or any optax transform, on the clock t = η·k)
    defenses  defences as optax transformations (static_projection, dynamic_projection, fisher_penalty,
              utility_penalty, coupling_suppression; registry DEFENSES / make_defense), their flow velocities
              (flow_velocity) and the figure-7 hooks projection_defense, dynamic_projection_defense
    record    record_path (Δu, drift ‖F^{1/2}Pδ‖, projection ratios, principal angles along a path)
    training  train (minibatch epochs over a dataset, full fine-tuning or masked/LoRA), TrainConfig
"""
from alignment_geom.dynamics.defenses import (
    DEFENSES,
    coupling_suppression,
    dynamic_projection,
    dynamic_projection_defense,
    fisher_penalty,
    flow_velocity,
    make_defense,
    projection_defense,
    static_projection,
    utility_penalty,
)
from alignment_geom.dynamics.flow import gradient_flow
from alignment_geom.dynamics.paths import discrete_path
from alignment_geom.dynamics.record import record_path
from alignment_geom.dynamics.training import TrainConfig, make_optimizer, train

__all__ = ["gradient_flow", "discrete_path", "projection_defense", "dynamic_projection_defense", "record_path",
           "TrainConfig", "make_optimizer", "train",
           "static_projection", "dynamic_projection", "fisher_penalty", "utility_penalty", "coupling_suppression",
           "flow_velocity", "DEFENSES", "make_defense"]
