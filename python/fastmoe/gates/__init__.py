"""Gates: ``Gate(d_model, num_expert, world_size, top_k, ...)``, ``forward(x) -> (topk_idx, topk_score)``; each
computes its logits and calls its op of csrc/ops/gates.cpp. ``GATES`` lists those docs/gates.md compares."""

from fastmoe.gates.base_gate import BaseGate
from fastmoe.gates.dc_gate import DCGate
from fastmoe.gates.expert_choice_gate import ExpertChoiceGate
from fastmoe.gates.gshard_gate import GShardGate
from fastmoe.gates.naive_gate import NaiveGate
from fastmoe.gates.noisy_gate import NoisyGate
from fastmoe.gates.sigmoid_gate import SigmoidGate
from fastmoe.gates.swipe_gate import SwipeGate
from fastmoe.gates.switch_gate import SwitchGate
from fastmoe.gates.zero_gate import ZeroGate

GATES = (NaiveGate, NoisyGate, GShardGate, SwitchGate, SwipeGate, ExpertChoiceGate, SigmoidGate)

__all__ = ["BaseGate", "DCGate", "GATES", "ZeroGate", *(cls.__name__ for cls in GATES)]
