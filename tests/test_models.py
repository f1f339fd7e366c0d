"""Unit tests for scaling.models: shapes, parameter counts and FLOP counts checked by hand."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from scaling.models import (
    ENCODER_NAMES,
    ContrastiveModel,
    ProjectionHead,
    build_encoder,
    count_parameters,
    encoder_flops,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("name", "width", "out_dim"),
    [("small_cnn", 8, 32), ("small_cnn", 16, 64), ("resnet18", 4, 32), ("resnet18", 8, 64)],
)
@pytest.mark.parametrize("image_size", [16, 32])
def test_encoder_output_shape(name: str, width: int, out_dim: int, image_size: int) -> None:
    enc = build_encoder(name, width=width)
    assert enc.out_dim == out_dim
    out = enc(torch.randn(3, 3, image_size, image_size))
    assert out.shape == (3, out_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_in_channels(name: str) -> None:
    enc = build_encoder(name, width=4, in_channels=1)
    assert enc(torch.randn(2, 1, 16, 16)).shape == (2, enc.out_dim)


def test_build_encoder_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="small_cnn, resnet18"):
        build_encoder("vit")
    for width in (0, -3):
        with pytest.raises(ValueError, match="width"):
            build_encoder("small_cnn", width=width)
    with pytest.raises(ValueError, match="width"):
        build_encoder("resnet18", width=0)


def test_small_cnn_structure() -> None:
    enc = build_encoder("small_cnn", width=8)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1)]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in enc.modules()) == 4


def test_small_cnn_parameter_count_by_hand() -> None:
    # width 8, RGB: conv weights (no bias) + BN (weight, bias) per layer
    convs = 3 * 8 * 9 + 8 * 16 * 9 + 16 * 32 * 9 + 32 * 32 * 9  # 216 + 1152 + 4608 + 9216 = 15192
    bns = 2 * (8 + 16 + 32 + 32)  # 176
    assert count_parameters(build_encoder("small_cnn", width=8)) == convs + bns == 15368


def test_resnet18_width64_parameter_count() -> None:
    tv = torchvision.models.resnet18(weights=None)
    tv_count = count_parameters(tv)
    assert tv_count == 11_689_512
    fc = 512 * 1000 + 1000  # 513,000
    stem_7x7 = 64 * 3 * 7 * 7  # 9,408
    stem_3x3 = 64 * 3 * 3 * 3  # 1,728
    expected = tv_count - fc - stem_7x7 + stem_3x3  # 11,168,832
    enc = build_encoder("resnet18", width=64)
    assert enc.out_dim == 512
    assert count_parameters(enc) == expected == 11_168_832
    assert isinstance(enc.maxpool, nn.Identity) and isinstance(enc.fc, nn.Identity)
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)


def _cifar_resnet18_params_by_hand(w: int) -> int:
    """Stem (3x3 conv + BN) and four stages of two BasicBlocks with w, 2w, 4w, 8w channels."""

    def block(c_in: int, c: int) -> int:  # two 3x3 convs + two BNs, plus a 1x1 conv + BN if c_in != c
        n = c_in * c * 9 + c * c * 9 + 4 * c
        return n + (c_in * c + 2 * c if c_in != c else 0)

    chans = [w, 2 * w, 4 * w, 8 * w]
    stem = 3 * w * 9 + 2 * w
    return stem + sum(block(c_in, c) + block(c, c) for c_in, c in zip([w, *chans[:-1]], chans))


@pytest.mark.parametrize("width", [16, 64])
def test_resnet18_width_scales_channels(width: int) -> None:
    enc = build_encoder("resnet18", width=width)
    assert enc.conv1.out_channels == width
    stages = [enc.layer1, enc.layer2, enc.layer3, enc.layer4]
    assert [s[-1].conv2.out_channels for s in stages] == [width, 2 * width, 4 * width, 8 * width]
    assert enc.out_dim == 8 * width
    assert count_parameters(enc) == _cifar_resnet18_params_by_hand(width)


def test_count_parameters_trainable_only() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[0].requires_grad_(False)
    assert count_parameters(net) == 15 + 8
    assert count_parameters(net, trainable_only=True) == 8


def test_projection_head_and_contrastive_model() -> None:
    enc = build_encoder("small_cnn", width=4)
    head = ProjectionHead(enc.out_dim, 32, 8)
    layers = list(head.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    model = ContrastiveModel(enc, head)
    x = torch.randn(5, 3, 16, 16)
    assert model(x).shape == (5, 8)
    assert model.encode(x).shape == (5, enc.out_dim)
    model.eval()
    torch.testing.assert_close(model(x), head(enc(x)))
    with pytest.raises(ValueError, match="encoder.out_dim"):
        ContrastiveModel(enc, ProjectionHead(enc.out_dim + 1, 32, 8))


def test_flops_tiny_conv_net_by_hand() -> None:
    net = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, stride=1, padding=1, bias=True),  # 8x8 -> 8x8
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    conv1 = (2 * 2 * 3 * 3 + 1) * 4 * 8 * 8  # (36 MACs x2 + bias) x 256 outputs = 37 * 256 = 9,472
    bn = 2 * 4 * 8 * 8  # 512
    conv2 = 2 * 4 * 3 * 3 * 6 * 4 * 4  # 6,912
    linear = (2 * 6 + 1) * 5  # 65
    assert encoder_flops(net, image_size=8, in_channels=2) == conv1 + bn + conv2 + linear == 16_961


def test_flops_small_cnn_width8_by_hand() -> None:
    enc = build_encoder("small_cnn", width=8)
    # layer: 2 * C_in * 9 * C_out * H_out * W_out   +   BN: 2 * C_out * H_out * W_out
    l1 = 2 * 3 * 9 * 8 * 16 * 16 + 2 * 8 * 16 * 16  # 110,592 + 4,096   (stride 2: 32 -> 16)
    l2 = 2 * 8 * 9 * 16 * 8 * 8 + 2 * 16 * 8 * 8  # 147,456 + 2,048    (stride 2: 16 -> 8)
    l3 = 2 * 16 * 9 * 32 * 4 * 4 + 2 * 32 * 4 * 4  # 147,456 + 1,024   (stride 2: 8 -> 4)
    l4 = 2 * 32 * 9 * 32 * 4 * 4 + 2 * 32 * 4 * 4  # 294,912 + 1,024   (stride 1: 4 -> 4)
    assert encoder_flops(enc, image_size=32) == l1 + l2 + l3 + l4 == 708_608


def test_flops_restores_mode_and_scales_with_image() -> None:
    enc = build_encoder("small_cnn", width=8)
    enc.train()
    f32 = encoder_flops(enc, 32)
    assert enc.training and all(m.training for m in enc.modules())
    # every layer's output area shrinks 4x from 32 to 16 px
    assert encoder_flops(enc, 16) * 4 == f32


def test_resnet18_flops_published_value() -> None:
    # CIFAR ResNet-18 is usually quoted at ~0.56 GMACs (conv + fc) at 32x32; we add BN at 2 FLOPs/elem.
    flops = encoder_flops(build_encoder("resnet18", width=64), 32)
    assert flops == 1_112_064_000
    assert 0.55e9 < flops / 2 < 0.57e9
