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

.PHONY: run test venv pretrained clean

run: $(STAMP) pretrained
	$(VENV)/bin/fedsim run $(ARGS)

test: $(STAMP) pretrained
	$(VENV)/bin/python -m pytest $(ARGS)

# The tiny CLIP that fedsim pre-trains itself (about 2.5 minutes on 2 cores, once per machine;
# cached under ~/.cache/fedsim/models). Part of the set-up, so runs and tests find it ready.
pretrained: $(STAMP)
	$(VENV)/bin/fedsim pretrain

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
