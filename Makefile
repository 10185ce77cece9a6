# bitdown: two commands for a fresh machine.
#   make demo   set up .venv, compress the real CIFAR-10 ResNet-20, print teacher vs compressed
#   make test   set up .venv, run the fast suite, then the real-asset (slow) suite
PY := .venv/bin/python
SHARED ?= ../shared/assets

.PHONY: demo test test-fast test-slow venv clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[zoo,bench,dev]"
	touch $@

venv: .venv/.installed

demo: .venv/.installed
	$(PY) -m bitdown.demo --assets $(SHARED)

test: .venv/.installed
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m slow

test-fast: .venv/.installed
	$(PY) -m pytest -q

test-slow: .venv/.installed
	$(PY) -m pytest -q -m slow

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache
