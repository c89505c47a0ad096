"""ResNet models from torchvision, initialised as in the paper (5.1). Knows nothing about training."""

from __future__ import annotations

import torch
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

from pipeline.config import ModelConfig


def _resnet10(**kwargs) -> ResNet:
    """torchvision's ResNet with one BasicBlock per stage: the CPU demo's model."""
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


_EXTRA_ARCHS = {"resnet10": _resnet10}


def valid_archs() -> list[str]:
    """Names accepted by model.arch."""
    resnets = {n for n in torchvision.models.list_models(module=torchvision.models) if "resnet" in n}
    return sorted(resnets | set(_EXTRA_ARCHS))


def check_arch(arch: str) -> None:
    """Raise naming the valid choices unless model.arch is a ResNet this module builds."""
    if arch not in valid_archs():
        raise ValueError(f"model.arch={arch!r} is not a torchvision ResNet; valid: {', '.join(valid_archs())}")


def build(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly initialised ResNet: He init for convs, FC ~ N(0, fc_init_std), optional zero-gamma.

    torchvision's ResNet already gives convs kaiming_normal_(fan_out, relu) (He init), BN gamma=1 beta=0,
    and with zero_init_residual=True gamma=0 on the last BN of every block; only the FC needs redoing.
    """
    check_arch(cfg.arch)
    kwargs = dict(num_classes=cfg.num_classes, zero_init_residual=cfg.zero_init_residual)
    if cfg.arch in _EXTRA_ARCHS:
        model = _EXTRA_ARCHS[cfg.arch](**kwargs)
    else:
        model = torchvision.models.get_model(cfg.arch, weights=None, **kwargs)
    torch.nn.init.normal_(model.fc.weight, mean=0.0, std=cfg.fc_init_std)
    torch.nn.init.zeros_(model.fc.bias)
    return model


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters (gradient elements) of the model, counted without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(cfg).parameters() if p.requires_grad)
