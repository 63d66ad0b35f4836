"""Swap a model's modules for others, in place: how a model gets its device's implementation of a layer once,
where it is prepared for the device, without a device check in the model files (gpt-fast's quantization swaps
its linears the same way)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_modules(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Put ``replacement(module)`` in place of every submodule of ``model`` where it is not None; returns how
    many were replaced. A replacement's own submodules are not visited again."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
    return replaced
