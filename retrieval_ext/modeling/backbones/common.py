"""Small helpers shared by the extra backbones."""

from typing import Iterable

from torch import nn

__all__ = ["freeze_by_prefix", "check_rgb_input"]


def freeze_by_prefix(module: nn.Module, prefixes: Iterable[str]) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter whose name starts with one of ``prefixes``.

    Returns:
        ``module``.
    """
    prefixes = tuple(prefixes)
    for name, param in module.named_parameters():
        if prefixes and name.startswith(prefixes):
            param.requires_grad_(False)
    return module


def check_rgb_input(backbone: str, input_shape) -> None:
    """Raise a ValueError naming ``backbone`` unless ``input_shape`` has 3 channels."""
    if input_shape.channels != 3:
        raise ValueError(f"{backbone} expects 3 input channels, got {input_shape.channels}")
