"""Whether the runs of a group fit the GPU, estimated from their dry forward passes (issue 17).

A built run holds its weights (student and the method's modules; measured, they are on the
device); training adds their gradients and SGD's momentum buffers (twice the parameters), and
a step's activations: what autograd keeps for the backward pass, every module output of the
student's forward pass, measured on the dry pass's few images and scaled to the batch. This is
an estimate on the high side (an in-place or view output counts as a copy); CUDA's allocator
adds its own slack, hence the headroom. ``kdbench.train.train_group`` builds a group's runs in
turn and, on CUDA, leaves the runs that would not fit to a later group of their own.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

# Fraction of the free memory a group may plan to use: the allocator's fragmentation, cuDNN's
# workspaces and the loss terms' temporaries take the rest.
HEADROOM = 0.8


def parameter_bytes(modules: Iterable[nn.Module]) -> int:
    seen: dict[int, Tensor] = {}
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return sum(p.numel() * p.element_size() for p in seen.values())


class ActivationCounter:
    """Counts the bytes of every leaf module's output in the forward passes inside the block:
    ``with ActivationCounter(student) as counted: student(sample)``, then
    ``counted.scaled(len(sample), batch_size)``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.bytes = 0
        self._handles: list = []

    def _count(self, module: nn.Module, inputs: tuple, output) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, Tensor):
                self.bytes += tensor.numel() * tensor.element_size()

    def __enter__(self) -> "ActivationCounter":
        leaves = [module for module in self.model.modules() if not list(module.children())]
        self._handles = [module.register_forward_hook(self._count) for module in leaves]
        return self

    def __exit__(self, *exception) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def scaled(self, images: int, batch_size: int) -> int:
        """The count for ``images`` images, scaled to a batch of ``batch_size``."""
        return self.bytes * batch_size // images


def still_to_allocate(parameter_sizes: list[int], activation_sizes: list[int]) -> int:
    """What a group's runs will allocate beyond their built models, once training starts:
    each run's gradients and momentum (twice its parameters), and the activations of ONE
    run's step: the lockstep loop finishes a run's backward pass (which frees its saved
    activations) before the next run's forward pass starts."""
    return 2 * sum(parameter_sizes) + max(activation_sizes, default=0)


def fits(parameter_sizes: list[int], activation_sizes: list[int], free_bytes: int) -> bool:
    """Whether the runs fit in ``free_bytes`` of device memory, with HEADROOM to spare."""
    return still_to_allocate(parameter_sizes, activation_sizes) <= HEADROOM * free_bytes
