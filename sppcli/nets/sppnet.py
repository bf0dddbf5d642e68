"""SPP-net classifier: trunk (conv1..conv5) -> spatial pyramid pooling -> fc head.

Used whole for pretraining and full-image classification; detection stages use its parts
(``features`` for conv5 maps, ``head.fc6_features`` / ``head.fc7_features`` on pooled windows).

Image normalisation lives here and only here: RGB images scaled to [0, 1], minus the ImageNet
mean, divided by the ImageNet standard deviation (torchvision's convention, which the
torchvision AlexNet / VGG-16 weights were trained with; our own ZF-5 nets are trained with the
same so that every trunk sees the same input).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sppcli.nets.heads import FcHead
from sppcli.nets.spp_layer import SpatialPyramidPooling, bins
from sppcli.nets.trunks import Trunk

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet images, RGB order, on the [0, 1] scale."""
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet images, RGB order, on the [0, 1] scale."""


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalise RGB pixel values in [0, 255] for the nets.

    Args:
        images: ``[3, H, W]`` or ``[B, 3, H, W]``, uint8 or float with values in [0, 255], RGB,
            on any device.

    Returns:
        float32 tensor of the same shape and device: ``(images / 255 - mean) / std``.
    """
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected [3, H, W] or [B, 3, H, W] RGB images, got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


def preprocess(image: np.ndarray) -> torch.Tensor:
    """One decoded image -> the net's input tensor.

    Args:
        image: ``[H, W, 3]`` uint8 numpy array, **RGB** channel order (PIL order; convert
            OpenCV's BGR first).

    Returns:
        ``[3, H, W]`` float32 CPU tensor, normalised by :func:`normalize`. Stack several (same
        size) for a batch; resizing is the caller's business.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {described}")
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return normalize(chw)


class SppNet(nn.Module):
    """Trunk + SPP layer + fc head.

    Args:
        trunk: a :class:`~sppcli.nets.trunks.Trunk` producing ``[B, C, H', W']`` conv5 maps.
        levels: SPP pyramid levels in output order, e.g. ``(6, 3, 2, 1)``.
        head: an :class:`~sppcli.nets.heads.FcHead` with ``in_dim == C * bins(levels)``.
        spp_mode: ``"paper"`` or ``"adaptive"`` binning, see :mod:`sppcli.nets.spp_layer`.

    Attributes:
        pixel_mean, pixel_std: the RGB normalisation constants (:data:`IMAGENET_MEAN_RGB`,
            :data:`IMAGENET_STD_RGB`) that :meth:`preprocess` applies.
    """

    pixel_mean = IMAGENET_MEAN_RGB
    pixel_std = IMAGENET_STD_RGB
    preprocess = staticmethod(preprocess)
    normalize = staticmethod(normalize)

    def __init__(self, trunk: Trunk, levels: Sequence[int], head: FcHead, spp_mode: str = "paper"):
        super().__init__()
        expected = trunk.out_channels * bins(levels)
        if head.in_dim != expected:
            raise ValueError(
                f"head takes {head.in_dim} inputs but the {trunk.name} trunk ({trunk.out_channels} channels) "
                f"with levels {tuple(levels)} ({bins(levels)} bins) gives {expected}"
            )
        self.trunk = trunk
        self.spp = SpatialPyramidPooling(levels, mode=spp_mode)
        self.head = head

    @property
    def levels(self) -> tuple[int, ...]:
        return self.spp.levels

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] normalised float -> conv5 maps [B, C, H', W'] (ReLU'd)."""
        return self.trunk(images)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> SPP vectors of the whole images, [B, C * bins]."""
        return self.spp(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] normalised float -> logits [B, num_classes] (fc7 [B, hidden]
        if the head has no fc8)."""
        return self.head(self.pooled(images))
