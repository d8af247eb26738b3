"""Gates: ``Gate(d_model, num_expert, world_size, top_k, ...)``, ``forward(x) -> (topk_idx, topk_score)``."""

from fastmoe.gates.base_gate import BaseGate
from fastmoe.gates.naive_gate import NaiveGate

__all__ = ["BaseGate", "NaiveGate"]
