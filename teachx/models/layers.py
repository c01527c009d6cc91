"""Small modules that make a backbone's graph visible to hooks, canonizers and LRP rules.

A residual ``a + b`` or an SE gate ``x * g`` written inline is invisible to module hooks, so an
LRP canonizer could not find it and DeepLIFT/SHAP could not treat it. Our backbones route these
operations through the modules below instead (one instance per use, like every activation).
"""

from __future__ import annotations

import torch
from torch import nn

from teachx.errors import ConfigError


class Add(nn.Module):
    """Residual addition ``a + b`` as a module (LRP splits relevance between the two inputs)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Mul(nn.Module):
    """Gating product ``x * gate`` (squeeze-and-excitation); LRP treats ``gate`` as a constant."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x * gate


class StochasticDepth(nn.Module):
    """Drop a residual branch per sample with probability ``p`` while training (Huang et al. 2016).

    Surviving branches are scaled by ``1 / (1 - p)`` so eval mode is the identity. The mask is
    drawn from torch's global generator, so ``torch.manual_seed`` (or ``seed_everything``) makes
    training runs reproducible; in eval mode, or with ``p == 0``, it returns its input unchanged.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(
                f"stochastic depth probability must be in [0, 1), got {p}; pass e.g. drop_path=0.2 (model.options.drop_path=0.2 on the command line)"
            )
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) < keep
        return x * mask.to(x.dtype) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: nn.Module | None = None,
    bn_eps: float = 1e-5,
) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d [-> activation] as ONE nn.Sequential.

    Keeping the BatchNorm as the conv's next sibling is what lets a canonizer fold it into the
    conv by walking Sequentials.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
    ]
    if activation is not None:
        layers.append(activation)
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convs and unit/zero BatchNorm (torchvision's choice); Linear keeps torch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
