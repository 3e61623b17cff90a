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
	touch $(STAMP)

weights: $(STAMP)
	$(VENV)/bin/export-and-tune fetch-weights mobilesam

# The default pipeline on the bundled CC0 images: fast search on the 12 search images (held-out: the other
# 12), then TensorRT-RTX engines (fp32, fp16) of the shipped encoder and the decoder, built without a GPU.
# Exit status 3 means the run completed and shipped the original encoder (no reliable improvement).
demo: weights
	$(VENV)/bin/export-and-tune run --model-type vit_t --out $(OUT) || test $$? -eq 3

test: weights
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
