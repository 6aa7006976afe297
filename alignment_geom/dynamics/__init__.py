"""Training dynamics from θ*: gradient flow, discrete optimiser paths, defences and path recorders (paper §4, §6).

    flow      gradient_flow (dopri5 or RK4 in lax control flow)
    paths     discrete_path (GD/SGD/Adam or any optax transform, on the clock t = η·k)
    defenses  projection_defense (static P(θ*)), dynamic_projection_defense (P(θ) re-estimated)
    record    record_path (Δu, drift ‖F^{1/2}Pδ‖, projection ratios, principal angles along a path)
    training  train (minibatch epochs over a dataset, full fine-tuning or masked/LoRA), TrainConfig
"""
from alignment_geom.dynamics.defenses import dynamic_projection_defense, projection_defense
from alignment_geom.dynamics.flow import gradient_flow
from alignment_geom.dynamics.paths import discrete_path
from alignment_geom.dynamics.record import record_path
from alignment_geom.dynamics.training import TrainConfig, make_optimizer, train

__all__ = ["gradient_flow", "discrete_path", "projection_defense", "dynamic_projection_defense", "record_path",
           "TrainConfig", "make_optimizer", "train"]
