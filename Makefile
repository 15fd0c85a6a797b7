# Every target creates .venv if it is missing; torch is installed first from the pin
# (the CPU wheel), so nothing pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v java >/dev/null 2>&1 || { echo "error: Java 17 is required by TorchServe (install openjdk-17-jre-headless)"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/guard demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

bench: $(STAMP)
	$(BIN)/guard bench --quick --out bench-out

lint: $(STAMP)
	$(BIN)/ruff check guard handlers tests

clean:
	rm -rf $(VENV) bench-out demo-out .pytest_cache
