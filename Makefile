# Two commands: `make run` and `make test`. Both create .venv when missing and install fedsim.
# The virtual environment itself lives in a cache outside the clone, keyed on pyproject.toml's
# hash, so a second clone reuses it; set VENV_CACHE= (empty) to build it inside .venv instead.

PYTHON ?= python3
VENV := .venv
KEY := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
VENV_CACHE ?= $(HOME)/.cache/fedsim/venv-$(KEY)
# The stamp names both the dependency set and this clone (the editable install points here).
STAMP := $(VENV)/.installed-$(KEY)-$(shell echo "$(CURDIR)" | sha256sum | cut -c1-8)
export FLWR_TELEMETRY_ENABLED := 0
ARGS ?=

.PHONY: run test venv clean

run: $(STAMP)
	$(VENV)/bin/fedsim run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
ifeq ($(strip $(VENV_CACHE)),)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e ".[dev]"
else
	@if [ ! -f "$(VENV_CACHE)/.complete" ]; then \
		echo "creating $(VENV_CACHE)"; rm -rf "$(VENV_CACHE)"; \
		$(PYTHON) -m venv "$(VENV_CACHE)" && \
		"$(VENV_CACHE)/bin/pip" install -e ".[dev]" && touch "$(VENV_CACHE)/.complete"; \
	fi
	rm -rf $(VENV) && ln -s "$(VENV_CACHE)" $(VENV)
	$(VENV)/bin/pip install --no-deps -q -e .
endif
	$(VENV)/bin/python -c "import open_clip, torchvision, flwr" 
	rm -f $(VENV)/.installed-* && touch $@

clean:
	rm -rf $(VENV) runs
