# Two entry points, each doing its own idempotent set-up in ./.venv:
#   make demo  - fetch MobileSAM, export it to ONNX and run the pipeline on the bundled CC0 images
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
	$(PIP) install -q -c constraints.txt -e '.[export,test]'
	touch $(STAMP)

weights: $(STAMP)
	$(VENV)/bin/export-and-tune fetch-weights mobilesam

# A reduced exhaustive search that finishes in a few minutes on 2 cores: 8 x 8 candidate pairs on the
# 12 bundled search images, all subsets of the best 4; held-out = the other 12 bundled images.
demo: weights
	$(VENV)/bin/export-and-tune run --model-type vit_t --data samples/data/isic2016 --out $(OUT) \
		--targets unsalient:8 --sources salient:8 --top-pairs 4

test: weights
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
