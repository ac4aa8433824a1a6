# The two set-up commands: `make demo` and `make test`. Both create/refresh .venv first.
# torch is installed before the package so pip takes the local CPU wheel (2.13.0) instead of
# resolving a newer CUDA build from the index. The stamp makes a second run a no-op.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test lint format clean gpu-check docs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" || $(PY) -m pip install -q "torch>=2.4,<3"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh

# exit 5 = pytest collected no tests: treated as a failure, never a silent pass.
# ruff first: lint and formatting are part of the test, so CI enforces them.
test: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# One GPU, <= 9 minutes: benchmark + a short real run; writes runs/gpu_check/gpu_check.json
# (docs/models.md). Uses the machine's python unless PYTHON is given; .whl/ wheels are installed first.
gpu-check:
	bash benchmarks/gpu_check.sh runs/gpu_check

# The configuration reference, generated from the option dataclasses (tests/test_configuration_doc.py
# fails when it is stale).
docs: $(STAMP)
	$(PY) -m blip2_dist.commands --markdown > docs/configuration.md

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs build *.egg-info
