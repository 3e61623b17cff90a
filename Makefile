# Two entry points, each doing its own idempotent set-up in ./.venv:
#   make demo  - fetch MobileSAM, export it to ONNX, tune it on the bundled CC0 images, build engines
#   make test  - run the test suite (fetches the MobileSAM weights first, so real-model tests run)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: setup demo test weights clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[export,test,trt]'
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation -c constraints.txt sam2==1.1.0
	# A real SAM app's runtime for the interop tests: samexporter's client needs only OpenCV, Pillow, numpy and
	# ONNX Runtime (its own dependencies pull another torch and the exporter's extras).
	$(PIP) install -q --no-deps samexporter==0.5.0 opencv-python-headless==5.1.0.95
	touch $(STAMP)

weights: $(STAMP)
	$(VENV)/bin/export-and-tune fetch-weights mobilesam

# The default pipeline on the 100 bundled CC0 isic2016 images: the first-order search on the first 50 (one
# prompt each, to finish in about 5 minutes on 2 cores; the default, 3 prompts per image, takes about 10),
# the shipping rule on the last 50, then TensorRT-RTX engines (fp32, fp16) of the shipped encoder and the
# decoder, built without a GPU. Exit status 3 means the run completed and shipped the original encoder.
demo: weights
	$(VENV)/bin/export-and-tune run --model-type vit_t --out $(OUT) --evidence given || test $$? -eq 3

# One pytest worker per core, at most 4 (tests/conftest.py shares the cores' threads among them); a test file stays
# whole on one worker, so its module fixtures are built once.
test: weights
	$(PY) -m pytest -q -n $$($(PY) -c 'import os; print(min(4, os.cpu_count() or 1))') --dist loadfile --durations=20 tests

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
