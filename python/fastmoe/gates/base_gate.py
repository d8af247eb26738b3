import torch
from torch import nn

from fastmoe import _checks


class BaseGate(nn.Module):
    """Common state of every gate: the expert counts and the balance loss of the last forward.

    ``num_expert`` is per rank; the gate routes over ``num_expert * world_size`` global experts.
    """

    def __init__(self, num_expert: int, world_size: int):
        super().__init__()
        self.num_expert = _checks.positive_int("num_expert", num_expert)
        self.world_size = _checks.positive_int("world_size", world_size)
        self.tot_expert = num_expert * world_size
        self.loss = None

    def set_loss(self, loss: torch.Tensor) -> None:
        self.loss = loss

    def get_loss(self, clear: bool = True):
        """The balance loss of the last forward (None if this gate has none); ``clear`` forgets it."""
        loss = self.loss
        if clear:
            self.loss = None
        return loss

    @property
    def has_loss(self) -> bool:
        return self.loss is not None
