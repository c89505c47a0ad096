"""ResNet models from torchvision, initialised as in the paper (5.1). Knows nothing about training."""

from __future__ import annotations

import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from pipeline.config import ModelConfig


def _resnet10(**kwargs) -> ResNet:
    """torchvision's ResNet with one BasicBlock per stage: the CPU demo's model."""
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


_EXTRA_ARCHS = {"resnet10": _resnet10}
# The blocks of the ResNets that model.width can narrow (torchvision's resnet18-152, and resnet10).
_STAGES = {"resnet10": (BasicBlock, [1, 1, 1, 1]), "resnet18": (BasicBlock, [2, 2, 2, 2]),
           "resnet34": (BasicBlock, [3, 4, 6, 3]), "resnet50": (Bottleneck, [3, 4, 6, 3]),
           "resnet101": (Bottleneck, [3, 4, 23, 3]), "resnet152": (Bottleneck, [3, 8, 36, 3])}


class _NarrowResNet(ResNet):
    """torchvision's ResNet with the channels of every stage scaled by width/64 (64-128-256-512 at width=64).

    torchvision fixes the stem at 64 channels and its stages at 64-512 (its width_per_group narrows only a
    Bottleneck's inner 3x3), so _make_layer scales each stage and the stem and the classifier are rebuilt to
    match; blocks, strides and initialisation stay torchvision's."""

    def __init__(self, block, layers: list[int], width: int, num_classes: int, zero_init_residual: bool):
        self.width = width  # read by _make_layer during ResNet.__init__
        super().__init__(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.conv1 = torch.nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        torch.nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.fc = torch.nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False):
        if planes == 64:  # the first stage follows the stem, which __init__ rebuilds with `width` channels
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def valid_archs() -> list[str]:
    """Names accepted by model.arch."""
    resnets = {n for n in torchvision.models.list_models(module=torchvision.models) if "resnet" in n}
    return sorted(resnets | set(_EXTRA_ARCHS))


def check_arch(cfg: ModelConfig) -> None:
    """Raise naming the valid choices unless model.arch is a ResNet this module builds at model.width."""
    if cfg.arch not in valid_archs():
        raise ValueError(f"model.arch={cfg.arch!r} is not a torchvision ResNet; valid: {', '.join(valid_archs())}")
    if cfg.width != 64 and cfg.arch not in _STAGES:
        raise ValueError(f"model.width={cfg.width} narrows only {', '.join(_STAGES)}, not model.arch={cfg.arch!r}; "
                         "leave model.width=64")


def build(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly initialised ResNet: He init for convs, FC ~ N(0, fc_init_std), optional zero-gamma.

    torchvision's ResNet already gives convs kaiming_normal_(fan_out, relu) (He init), BN gamma=1 beta=0,
    and with zero_init_residual=True gamma=0 on the last BN of every block; only the FC needs redoing.
    """
    check_arch(cfg)
    kwargs = dict(num_classes=cfg.num_classes, zero_init_residual=cfg.zero_init_residual)
    if cfg.width != 64:
        model = _NarrowResNet(*_STAGES[cfg.arch], width=cfg.width, **kwargs)
    elif cfg.arch in _EXTRA_ARCHS:
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
