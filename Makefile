# sppcli: `make demo` runs the whole pipeline on the embedded dataset; `make test` runs the tests.
# Both create the virtual environment themselves (`make install`).

PYTHON     ?= python3
VENV       ?= .venv
# A CPU build by default. GPU users pick a CUDA build, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url <PyTorch CUDA wheel index URL>"
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
SPP        ?= $(BIN)/sppcli
STAMP      := $(VENV)/.sppcli-installed
CACHE      ?= cache
WORKERS    ?= 2
DEVICE     ?= auto

.PHONY: install test demo paper voc2007-detect bench clean help
.DEFAULT_GOAL := help

help:
	@echo "make demo            whole pipeline on the embedded synthetic dataset (CPU, minutes)"
	@echo "make test            the test suite"
	@echo "make paper           the paper's Tables 1, 2, 3, 4 and 9 on the embedded data (CPU, long)"
	@echo "make voc2007-detect  VOC_ROOT=.../VOCdevkit/VOC2007 WEIGHTS=... [NET=zf5|alexnet|vgg16] [SCALES=1|5] [DEVICE=cuda]"
	@echo "make bench           speed benchmarks (bench/)"
	@echo "make clean           remove $(VENV) and the artifacts under $(CACHE)/"

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test,dask]"
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

# ---------------------------------------------------------------------------------------------
# The demo: every stage of the paper's detection pipeline on the embedded dataset, then the
# Table 6 analog. Each command skips itself when its artifact is up to date, so a second
# `make demo` (or one after Ctrl-C) only does what is left.
DEMO := --config pipelines/demo.toml --cache-dir $(CACHE)
ROWS := pool5 fc6 ftfc6 ftfc7 ftfc7bb
# Table 6's multi-scale column: the paper's five scales around 688 for VOC's ~500 x 375 images,
# scaled to the embedded 320 x 240 ones (the 1-scale column is demo.toml's 240).
DEMO_SCALES := 160,240,320
DEMO_MS := $(DEMO) --set features.scales=[$(DEMO_SCALES)]

# One Table 6 column: features, windows, fine-tuning, box regression and every row. The argument
# is the *name* of the options variable, since the scales' commas would split a $(call) argument.
define detector_column
	$(SPP) extract-features $($(1)) --split trainval --device $(DEVICE)
	$(SPP) extract-features $($(1)) --split test --device $(DEVICE)
	$(SPP) pool-windows $($(1)) --split trainval --workers $(WORKERS)
	$(SPP) pool-windows $($(1)) --split test --workers $(WORKERS)
	$(SPP) finetune-fc $($(1)) --device $(DEVICE)
	$(SPP) train-bbox-reg $($(1))
	for row in $(ROWS); do \
	  $(SPP) train-svm $($(1)) --variant $$row --device $(DEVICE) && \
	  $(SPP) detect $($(1)) --variant $$row --device $(DEVICE) && \
	  $(SPP) evaluate $($(1)) --variant $$row -q || exit 1; \
	done
endef

demo: install
	$(SPP) make-dataset $(DEMO)
	$(SPP) proposals $(DEMO) --split trainval --workers $(WORKERS)
	$(SPP) proposals $(DEMO) --split test --workers $(WORKERS)
	$(SPP) pretrain $(DEMO) --workers 1 --device $(DEVICE)
	$(call detector_column,DEMO)
	$(call detector_column,DEMO_MS)
	$(SPP) show $(DEMO) --variant ftfc7bb --score 0 --limit 12
	$(SPP) classify $(DEMO) --device $(DEVICE)
	$(SPP) report $(DEMO) --scales $(DEMO_SCALES) --html

# The paper's tables on the embedded data; Table 4 classifies a folder-per-class set of classes
# that neither the pretraining nor the detection set has (the Caltech101 analog).
CALTECH := $(CACHE)/data/synth/caltech

paper: install
	$(SPP) make-dataset $(DEMO)
	$(SPP) make-dataset $(DEMO) --kind caltech --out $(CALTECH)
	$(SPP) paper $(DEMO) --folder $(CALTECH) --device $(DEVICE)

# ---------------------------------------------------------------------------------------------
# A real PASCAL VOC 2007 devkit with the paper's settings. Interrupted anywhere, the same
# command resumes. WEIGHTS: our checkpoint (sppcli pretrain) or a torchvision .pth for NET.
VOC_ROOT ?=
WEIGHTS  ?=
NET      ?= zf5
SCALES   ?= 1
VOC_SCALES_1 := 688
# The release's five scales (Script_spp_voc.m); the paper lists 864 for the fourth.
VOC_SCALES_5 := 480,576,688,874,1200
# VOC_EXTRA: more options for every stage, e.g. VOC_EXTRA="--set dataset.classes=[\"elephant\"]".
VOC_EXTRA ?=
# SETUP: the prerequisite that installs sppcli; tests run the target with SETUP= and SPP=...
SETUP ?= install
VOC := --config pipelines/voc2007.toml --cache-dir $(CACHE) --set 'dataset.devkit="$(VOC_ROOT)"' \
       --set 'net.trunk="$(NET)"' --set 'features.weights="$(abspath $(WEIGHTS))"' \
       --set features.scales=[$(VOC_SCALES_$(SCALES))] $(VOC_EXTRA)

voc2007-detect: $(SETUP)
	@test -n "$(VOC_ROOT)" || { echo "set VOC_ROOT=/path/to/VOCdevkit/VOC2007"; exit 2; }
	@test -n "$(WEIGHTS)" || { echo "set WEIGHTS=/path/to/weights (.pt from sppcli pretrain, or torchvision .pth)"; exit 2; }
	$(SPP) proposals $(VOC) --split trainval --workers $(WORKERS)
	$(SPP) proposals $(VOC) --split test --workers $(WORKERS)
	$(SPP) extract-features $(VOC) --split trainval --device $(DEVICE) --workers $(WORKERS)
	$(SPP) extract-features $(VOC) --split test --device $(DEVICE) --workers $(WORKERS)
	$(SPP) pool-windows $(VOC) --split trainval --workers $(WORKERS)
	$(SPP) pool-windows $(VOC) --split test --workers $(WORKERS)
	$(SPP) finetune-fc $(VOC) --device $(DEVICE)
	$(SPP) train-bbox-reg $(VOC)
	$(SPP) train-svm $(VOC) --variant ftfc7bb --device $(DEVICE)
	$(SPP) detect $(VOC) --variant ftfc7bb --device $(DEVICE) --workers $(WORKERS)
	$(SPP) evaluate $(VOC) --variant ftfc7bb
	$(SPP) report $(VOC)

bench: install
	$(BIN)/python bench/bench_spp_pool.py
	$(BIN)/python bench/bench_rcnn_vs_spp.py
	$(BIN)/python bench/bench_features.py

clean:
	rm -rf $(VENV)
	find $(CACHE) -mindepth 1 ! -name .gitignore ! -name README.md -exec rm -rf {} +
