"""Gates: ``Gate(d_model, num_expert, world_size, top_k, ...)``, ``forward(x) -> (topk_idx, topk_score)``.

``GATES`` lists every gate class; docs/gates.md compares them.
"""

from fastmoe.gates.base_gate import BaseGate
from fastmoe.gates.expert_choice_gate import ExpertChoiceGate
from fastmoe.gates.gshard_gate import GShardGate
from fastmoe.gates.naive_gate import NaiveGate
from fastmoe.gates.noisy_gate import NoisyGate
from fastmoe.gates.sigmoid_gate import SigmoidGate
from fastmoe.gates.swipe_gate import SwipeGate
from fastmoe.gates.switch_gate import SwitchGate

GATES = (NaiveGate, NoisyGate, GShardGate, SwitchGate, SwipeGate, ExpertChoiceGate, SigmoidGate)

__all__ = [
    "BaseGate",
    "ExpertChoiceGate",
    "GATES",
    "GShardGate",
    "NaiveGate",
    "NoisyGate",
    "SigmoidGate",
    "SwipeGate",
    "SwitchGate",
]
