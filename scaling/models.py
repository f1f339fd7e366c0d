"""Encoders, the SimCLR projection head, and parameter / FLOP counters.

Two encoders, picked by a literal name (``build_encoder``):

``small_cnn``
    Four 3x3 conv layers of widths ``(w, 2w, 4w, 4w)`` with strides ``(2, 2, 2, 1)``, each followed by
    BatchNorm and ReLU, then global average pooling. ``out_dim = 4 * w``. At 32x32 the feature maps are
    16, 8, 4, 4 pixels wide; the stride-2 first layer is what keeps it at a few seconds per epoch on a
    CPU (a stride-1 first layer measured 2.4x slower, see NOTES "Data").

``resnet18``
    The CIFAR variant of ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition";
    stem as in the SimCLR CIFAR experiments): torchvision's ``resnet18(weights=None)`` with the 7x7
    stride-2 stem replaced by a 3x3 stride-1 conv, no max-pool and ``fc = Identity``. ``width`` is the
    base channel count: the four stages have ``(w, 2w, 4w, 8w)`` channels (the stem has ``w``), so
    ``width=64`` is the standard network and ``out_dim = 8 * w``. torchvision's ``width_per_group``
    cannot do this (BasicBlock rejects it), so for ``w != 64`` the stages are rebuilt with
    torchvision's own ``ResNet._make_layer`` and ``BasicBlock`` and re-initialised as torchvision does.

FLOP convention (``encoder_flops``): forward FLOPs for ONE image, a multiply-add counted as 2 FLOPs.
Only ``Conv2d``, ``Linear`` and ``BatchNorm2d`` are counted:

- ``Conv2d``: ``2 * (C_in / groups) * k_h * k_w`` per output element, plus 1 per output element if
  the conv has a bias;
- ``Linear``: ``2 * in_features`` per output element, plus 1 per output element if it has a bias;
- ``BatchNorm2d``: 2 per element (at inference it is one fused multiply-add, ``x * scale + shift``).

ReLU, pooling and residual additions are not counted (they are under 1 % of a conv net's FLOPs).
The count is measured with forward hooks on one dummy input, so it follows whatever the forward pass
does (strides, padding, image size) without a hand-written formula per architecture.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ENCODER_NAMES",
    "ContrastiveModel",
    "ProjectionHead",
    "SmallCNN",
    "build_encoder",
    "count_parameters",
    "encoder_flops",
]

ENCODER_NAMES: tuple[str, ...] = ("small_cnn", "resnet18")


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers and a global average pool; fast on a CPU.

    Widths ``(w, 2w, 4w, 4w)``, 3x3 kernels, strides ``(2, 2, 2, 1)``, padding 1, convs without bias
    (BatchNorm follows). ``out_dim = 4 * width``.

    Shape:
        ``(B, in_channels, H, W)`` float -> ``(B, 4 * width)``.
    """

    STRIDES: tuple[int, ...] = (2, 2, 2, 1)

    def __init__(self, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, stride in zip(widths, self.STRIDES, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _cifar_resnet18(width: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet18  # imported here: about 1 s that small_cnn trials need not pay
    from torchvision.models.resnet import BasicBlock

    net = resnet18(weights=None)
    # CIFAR stem: 3x3 stride 1, no max-pool (a 7x7/2 conv + pool would leave 8x8 maps of a 32x32 image).
    net.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    if width != 64:
        net.bn1 = nn.BatchNorm2d(width)
        net.inplanes = width
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
    # Same initialisation as torchvision's ResNet.__init__, applied to everything we replaced too.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    net.out_dim = 8 * width  # type: ignore[assignment]
    return net


def build_encoder(name: str, *, width: int = 32, in_channels: int = 3) -> nn.Module:
    """Build an encoder by name; the result has ``out_dim: int``.

    Args:
        name: one of ``ENCODER_NAMES``.
        width: base channel count (``small_cnn``: first layer, ``out_dim = 4 * width``;
            ``resnet18``: stem and first stage, ``out_dim = 8 * width``; 64 is the standard ResNet-18).
        in_channels: image channels (3 for RGB, 1 for grayscale data such as digits).

    Shape:
        ``(B, in_channels, H, W)`` float -> ``(B, out_dim)``.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if name == "small_cnn":
        return SmallCNN(width=width, in_channels=in_channels)
    if name == "resnet18":
        return _cifar_resnet18(width, in_channels)
    raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)}")


class ProjectionHead(nn.Module):
    """SimCLR projection MLP: ``Linear - BatchNorm1d - ReLU - Linear``.

    Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations".
    The first Linear has no bias (BatchNorm follows), the last one has.

    Shape:
        ``(B, in_dim)`` -> ``(B, out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        for label, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ContrastiveModel(nn.Module):
    """An encoder followed by a projection head.

    ``forward(x)`` gives the projections the loss sees; ``encode(x)`` the features used for evaluation.

    Shape:
        ``forward``: ``(B, C, H, W)`` -> ``(B, head.out_dim)``;
        ``encode``: ``(B, C, H, W)`` -> ``(B, encoder.out_dim)``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        enc_dim = getattr(encoder, "out_dim", None)
        head_dim = getattr(head, "in_dim", None)
        if enc_dim is not None and head_dim is not None and enc_dim != head_dim:
            raise ValueError(
                f"head.in_dim ({head_dim}) must equal encoder.out_dim ({enc_dim}); "
                f"build the head with ProjectionHead({enc_dim}, hidden_dim, out_dim)"
            )
        self.encoder = encoder
        self.head = head

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _module_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    out_elems = output.numel() // output.shape[0]
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        per_out = 2 * (module.in_channels // module.groups) * k_h * k_w
        return out_elems * (per_out + (1 if module.bias is not None else 0))
    if isinstance(module, nn.Linear):
        return out_elems * (2 * module.in_features + (1 if module.bias is not None else 0))
    if isinstance(module, nn.BatchNorm2d):
        return 2 * out_elems
    return 0


def encoder_flops(encoder: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Forward FLOPs for one ``image_size`` x ``image_size`` image (module docstring: convention).

    Runs one dummy image through ``encoder`` in eval mode without gradients, counting with forward
    hooks on ``Conv2d``, ``Linear`` and ``BatchNorm2d``; the modules' train/eval flags are restored.
    """
    if image_size < 1 or in_channels < 1:
        raise ValueError(f"image_size and in_channels must be >= 1, got {image_size}, {in_channels}")
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += _module_flops(module, inputs, output)

    counted = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, counted)]
    modes = {m: m.training for m in encoder.modules()}
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    try:
        encoder.eval()
        with torch.no_grad():
            encoder(torch.zeros(1, in_channels, image_size, image_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return total
