"""Datasets: the VOC devkit reader/writer (:mod:`sppcli.data.voc`) and the synthetic VOC-format
default dataset (:mod:`sppcli.data.synth`). Import the submodules directly; this package stays
light so that ``sppcli --help`` does not load numpy or PIL."""
