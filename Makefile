# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv and install the project.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
# The sample corpus is small: shards of 64 samples (so several run in parallel) and a benchmark scaled to its chapters.
DEMO_ARGS ?= --max-samples 64 --bench-chapters 2 --bench-refs 10 --bench-bw 10 --bench-max-series-fraction 0.25
EXTRAS ?= cpu,dev

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.pipeline --generate-sample $(DEMO_DIR)/corpus --output $(DEMO_DIR)/data --report $(DEMO_DIR)/report \
		--encoder weightfree --renderer halftone $(DEMO_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900

bench: $(STAMP)
	for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
