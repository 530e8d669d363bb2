"""Placement of pipeline parts around the stage that uses them."""

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class MemoryManager:
    """Moves a part onto the execution device for the stage that runs it.

    mode "none": every part stays on `device`; other modes are added by the offloading work.
    """

    def __init__(self, device: str | torch.device = "cpu", mode: str = "none") -> None:
        self.device = torch.device(device)
        self.mode = mode

    @contextmanager
    def running(self, module: nn.Module) -> Iterator[nn.Module]:
        """Context in which `module` is ready to run on `self.device`."""
        module.to(self.device)
        yield module
