"""Reference implementations in plain PyTorch, shipped so users and tests can check fastmoe against them."""

from fastmoe.testing.reference import dense_mlp, reference_moe_mlp, reference_plan, reference_route_topk

__all__ = ["dense_mlp", "reference_moe_mlp", "reference_plan", "reference_route_topk"]
