"""Pure tensor operators: boxes (IoU, NMS, regression deltas), geometry (image <-> feature-map
coordinates, scale choice) and spp_pool (pyramid pooling of windows).

Import the submodules directly (``from sppcli.ops.boxes import nms``); this package module
imports nothing so that importing ``sppcli`` stays light.
"""
