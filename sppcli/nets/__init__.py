"""SPP-net networks: conv trunks, the spatial pyramid pooling layer, fc heads, checkpoints.

``build_net(arch)`` makes a net, ``load_weights(path)`` loads an sppcli checkpoint or a
torchvision AlexNet / VGG-16 file, ``SppNet.preprocess`` turns an RGB uint8 image into input.
"""

from sppcli.nets.checkpoint import (
    ARCH_DEFAULTS,
    LoadedNet,
    LoadReport,
    WeightsMismatchError,
    arch_of,
    build_net,
    load_checkpoint,
    load_torchvision_weights,
    load_weights,
    normalize_arch,
    save_checkpoint,
)
from sppcli.nets.heads import FcHead
from sppcli.nets.receptive_field import feature_map_size, layer_specs
from sppcli.nets.spp_layer import SpatialPyramidPooling, bins
from sppcli.nets.sppnet import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, SppNet, normalize, preprocess
from sppcli.nets.trunks import TRUNK_NAMES, ZF5, AlexNetTrunk, Trunk, VGG16Trunk, build_trunk

__all__ = [
    "ARCH_DEFAULTS",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "TRUNK_NAMES",
    "ZF5",
    "AlexNetTrunk",
    "FcHead",
    "LoadReport",
    "LoadedNet",
    "SpatialPyramidPooling",
    "SppNet",
    "Trunk",
    "VGG16Trunk",
    "WeightsMismatchError",
    "arch_of",
    "bins",
    "build_net",
    "build_trunk",
    "feature_map_size",
    "layer_specs",
    "load_checkpoint",
    "load_torchvision_weights",
    "load_weights",
    "normalize",
    "normalize_arch",
    "preprocess",
    "save_checkpoint",
]
