"""Convolutional trunks: image [B, 3, H, W] -> ReLU'd conv5 feature maps [B, C, H', W'].

Every trunk stops after conv5 (+ReLU): the pooling layer that used to follow conv5 is what the
spatial pyramid pooling layer replaces (paper section 2.2).

* :class:`ZF5` -- the paper's baseline, Zeiler & Fergus' "fast" model, layer for layer as in
  the authors' release (``model-defs/Zeiler_conv5.prototxt`` of SPP_net):
  conv1 96 7x7/2 pad 1, ReLU, LRN, max-pool 3/2; conv2 256 5x5/2 pad 0, ReLU, LRN, max-pool 3/2;
  conv3 384, conv4 384, conv5 256, all 3x3/1 pad 1 with ReLU. Max pools round up (Caffe).
  The LRN is Caffe's WITHIN_CHANNEL normalisation with the release's values
  (local_size 3, alpha 5e-5, beta 0.75), see :class:`WithinChannelLRN`.
  With conv2 unpadded, a 224x224 input gives a 13x13 conv5 map and 180x180 gives 10x10, the
  sizes the paper states for its two training networks; 688x917 gives 42x56. Total stride 16.
* :class:`AlexNetTrunk`, :class:`VGG16Trunk` -- ``features`` identical, index for index, to
  torchvision's ``alexnet().features`` / ``vgg16().features`` *without their last max-pool*
  (``features.12`` / ``features.30``, parameter-free), so the conv weights of a torchvision
  ``alexnet-owt-*.pth`` / ``vgg16-*.pth`` file load under the same names. Their pools keep
  torchvision's floor rounding, as the weights were trained with it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
import torch
import torch.nn.functional as F
from torch import nn

from sppcli.nets.receptive_field import feature_map_size, trunk_geometry
from sppcli.ops.geometry import FieldGeometry

TRUNK_NAMES = ("zf5", "alexnet", "vgg16")

# Channel counts at width 1.0.
ZF5_CHANNELS = (96, 256, 384, 384, 256)
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
# torchvision's configuration "D"; "M" is a 2x2/2 max-pool. The final "M" is left out on purpose.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded half up, at least 8 (width=0.25: 96 -> 24, 256 -> 64)."""
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width!r}")
    return max(8, int(math.floor(channels * width + 0.5)))


class WithinChannelLRN(nn.Module):
    """Caffe's LRN with ``norm_region: WITHIN_CHANNEL`` (used by ZF-5 in the SPP-net release).

    ``y = x / (1 + alpha * mean_{size x size}(x^2)) ** beta`` where the mean is over a
    ``size x size`` spatial window centred on each cell of the same channel, zero-padded at the
    border and always divided by ``size * size`` (Caffe's average pooling counts the padding).
    ``nn.LocalResponseNorm`` normalises *across* channels instead, so it is not a substitute.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``, any float dtype.
    """

    preserves_spatial_size = True

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"LRN size must be a positive odd number, got {size}")
        self.size = size
        self.alpha = alpha
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        scale = mean_square.mul_(self.alpha).add_(1.0)
        if self.beta != 0.75:
            return x / scale.pow(self.beta)
        # scale^-0.75 = rsqrt(scale) * rsqrt(sqrt(scale)): ~3x faster than pow's exp and log on the
        # conv1 map (the trunk's largest tensor; LRN was 40% of ZF-5's time), equal to ~2e-7.
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.rsqrt(scale) * torch.rsqrt(torch.sqrt(scale)) * x
        factor = torch.rsqrt(scale)
        return factor.mul_(scale.sqrt_().rsqrt_()).mul_(x)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class Trunk(nn.Module):
    """Base class: a ``features`` chain whose output is the ReLU'd conv5 map.

    Attributes:
        name: ``"zf5"``, ``"alexnet"`` or ``"vgg16"``.
        width: channel multiplier the trunk was built with.
        out_channels: C of the conv5 map.
        torchvision_classifier: for trunks with a torchvision counterpart, which
            ``classifier.<i>`` module of torchvision holds fc6 / fc7 / fc8; ``None`` otherwise.
    """

    name: str = ""
    torchvision_classifier: dict[str, str] | None = None

    def __init__(self, features: nn.Sequential, out_channels: int, width: float):
        super().__init__()
        self.features = features
        self.out_channels = out_channels
        self.width = width
        _init_conv_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] float (normalised, see ``SppNet.preprocess``) -> [B, C, H', W']."""
        return self.features(images)

    @property
    def geometry(self) -> FieldGeometry:
        """Total stride and receptive-field offsets, derived from this trunk's own layers."""
        return trunk_geometry(self)

    def feature_map_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of the conv5 map for an ``height`` x ``width`` image, without running it."""
        return feature_map_size(self, height, width)


def _init_conv_weights(module: nn.Module) -> None:
    # He initialisation suits the ReLU chains; the release's N(0, 0.01) stalls deep nets trained
    # from scratch without its long warm-up.
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)


class ZF5(Trunk):
    """ZF-5 conv1..conv5 as in the SPP-net release (see module docstring).

    Args:
        width: channel multiplier (width=0.25 gives 24, 64, 96, 96, 64 channels), for small
            CPU nets in the demo pipeline.
    """

    name = "zf5"

    def __init__(self, width: float = 1.0):
        c1, c2, c3, c4, c5 = (scale_channels(c, width) for c in ZF5_CHANNELS)
        layers = OrderedDict(
            [
                ("conv1", nn.Conv2d(3, c1, kernel_size=7, stride=2, padding=1)),
                ("relu1", nn.ReLU(inplace=True)),
                ("norm1", WithinChannelLRN(size=3, alpha=5e-5, beta=0.75)),
                ("pool1", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)),
                ("conv2", nn.Conv2d(c1, c2, kernel_size=5, stride=2, padding=0)),
                ("relu2", nn.ReLU(inplace=True)),
                ("norm2", WithinChannelLRN(size=3, alpha=5e-5, beta=0.75)),
                ("pool2", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)),
                ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),
                ("relu3", nn.ReLU(inplace=True)),
                ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1)),
                ("relu4", nn.ReLU(inplace=True)),
                ("conv5", nn.Conv2d(c4, c5, kernel_size=3, padding=1)),
                ("relu5", nn.ReLU(inplace=True)),
            ]
        )
        super().__init__(nn.Sequential(layers), out_channels=c5, width=width)


class AlexNetTrunk(Trunk):
    """torchvision AlexNet ``features.0`` .. ``features.11`` (conv5 + ReLU; pool5 dropped).

    Parameter names ``features.{0,3,6,8,10}.{weight,bias}`` match torchvision. fc6/fc7/fc8
    of a torchvision file live in ``classifier.1`` / ``classifier.4`` / ``classifier.6``.
    """

    name = "alexnet"
    torchvision_classifier = {"fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}

    def __init__(self, width: float = 1.0):
        c1, c2, c3, c4, c5 = (scale_channels(c, width) for c in ALEXNET_CHANNELS)
        features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        super().__init__(features, out_channels=c5, width=width)


class VGG16Trunk(Trunk):
    """torchvision VGG-16 ``features.0`` .. ``features.29`` (conv5_3 + ReLU; pool5 dropped).

    Parameter names ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`` match
    torchvision. fc6/fc7/fc8 of a torchvision file live in ``classifier.0`` / ``.3`` / ``.6``.
    """

    name = "vgg16"
    torchvision_classifier = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}

    def __init__(self, width: float = 1.0):
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in VGG16_CONFIG:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = scale_channels(int(entry), width)
            layers += [nn.Conv2d(in_channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = out
        super().__init__(nn.Sequential(*layers), out_channels=in_channels, width=width)


_TRUNK_CLASSES: dict[str, type[Trunk]] = {"zf5": ZF5, "alexnet": AlexNetTrunk, "vgg16": VGG16Trunk}


def trunk_class(name: str) -> type[Trunk]:
    """The trunk class called ``name`` (one of :data:`TRUNK_NAMES`)."""
    try:
        return _TRUNK_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown trunk {name!r}; known trunks: {', '.join(TRUNK_NAMES)}") from None


def build_trunk(name: str, width: float = 1.0) -> Trunk:
    """A freshly initialised trunk by name (one of :data:`TRUNK_NAMES`)."""
    return trunk_class(name)(width=width)
