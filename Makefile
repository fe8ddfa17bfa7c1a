# Two entry points for a fresh machine; each does its own setup.
#   make demo   the live demo (camera bridge on bundled frames -> daemon on the bundled model -> monitor)
#   make test   the test suite (what CI runs through .ci/run)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup-runtime setup-dev

demo: $(VENV)/.stamp-runtime
	$(BIN)/cytoedge demo $(ARGS)

test: $(VENV)/.stamp-dev
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; browser tests will be skipped"; }
	$(BIN)/python -m pytest -q $(ARGS)

$(VENV)/.stamp-runtime: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[export,dev]'
	touch $@ $(VENV)/.stamp-runtime
