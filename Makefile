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

.PHONY: run test chromium
run: $(STAMP)
	$(VENV)/bin/phiforge recipe --out runs/default

test: $(STAMP) chromium
	$(VENV)/bin/python -m pytest

# tests/test_chat_page.py drives Debian's chromium through playwright (never playwright's own downloaded browsers).
# Installed here when missing and we are root with apt-get; otherwise, or if the install fails, those tests skip and
# say why: the rest of the suite still runs.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian chromium for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	      echo "make: could not install chromium; the browser tests will skip"; \
	  else \
	    echo "make: no /usr/bin/chromium and no apt-get as root; the browser tests will skip"; \
	  fi; \
	fi
