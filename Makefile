# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_TELEMETRY := false
export DVC_NO_ANALYTICS := 1

.PHONY: venv demo test bench clean

$(BIN)/podium: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $(BIN)/podium

venv: $(BIN)/podium

demo: venv
	$(BIN)/podium retrain --config configs/demo.yaml

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf .podium mlruns mlartifacts mlflow.db store .dvcstore
