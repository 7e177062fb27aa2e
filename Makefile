# The two set-up commands of the README:
#   make run    # fresh machine -> venv -> the whole Phi-3 recipe on the embedded default
#   make test   # fresh machine -> venv -> the test suite (what .ci/run calls)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned exactly: the CPU wheel is cached here; anything looser pulls CUDA builds.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

.PHONY: run test
run: $(STAMP)
	$(VENV)/bin/phiforge recipe --out runs/default

test: $(STAMP)
	$(VENV)/bin/python -m pytest
