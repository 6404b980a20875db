# The two commands a new user needs: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
DEMO_DIR ?= runs/demo

.PHONY: install test test-fast demo shapes lint clean

install: $(VENV)/.installed

# Re-installs when pyproject.toml changes. The final import check catches a torch/torchvision
# pair that does not match (see README, "Install").
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	$(PY) -c "import torch, torchvision, open_clip, decord, diffusers, ray; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| open_clip', open_clip.__version__, '| ray', ray.__version__)"
	touch $@

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

demo: install
	$(PY) -m training.demo --output $(DEMO_DIR)

# Every model of the shapes world trained end to end (resumable; README, "The shapes world").
shapes: install
	$(PY) -m shapes.build --out runs/shapes

lint: install
	$(VENV)/bin/ruff check pipeline training tuning fixtures shapes tests
	$(VENV)/bin/ruff format --check pipeline training tuning fixtures shapes tests

clean:
	rm -rf $(VENV) runs .pytest_cache
