# Two commands do everything on a fresh machine (Python 3.11, PyPI reachable, no GPU needed):
#   make demo   set up, then run the main job on the embedded default (synthetic data,
#               EfficientNet-Lite0, offline) and write its report under output/demo
#   make test   set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV
# OpenMP threads that spin while waiting make small CPU models 5-10x slower as soon as another
# process competes for the cores; passive waiting costs nothing when the machine is idle.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo demo-quick test lint benchmark serve

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) tools/demo.py --output-dir output/demo

demo-quick: setup
	$(PY) tools/demo.py --quick --output-dir output/demo-quick

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m black --check -l 100 retrieval_ext tools tests
	$(PY) -m isort --check --profile black -l 100 retrieval_ext tools tests
	$(PY) -m flake8 --max-line-length 100 retrieval_ext tools tests

benchmark: setup
	$(PY) tools/benchmark.py extraction

# the browser UI on the main job's off-the-shelf index (run `make demo` first); PORT=8000 by default
PORT ?= 8000
serve: setup
	@test -f output/demo/off_the_shelf/index/manifest.json || { echo "no index yet: run make demo first"; exit 1; }
	DETECTRON2_DATASETS=output/demo/datasets $(PY) tools/serve.py --port $(PORT) \
		--config-file output/demo/off_the_shelf/config.yaml
