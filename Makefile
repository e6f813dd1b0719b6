# Every target installs what it needs first (idempotent), so each works on a bare checkout.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: install run test bench loadtest lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[train,bench,dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install
	$(BIN)/ifa-rank data movielens --dir data
	@if [ ! -f artifacts/latest ]; then \
		$(BIN)/ifa-rank train --data movielens --model ifa --preset small --epochs 3 --out runs/quickstart && \
		$(BIN)/ifa-rank export runs/quickstart/checkpoint.pt --out artifacts; \
	else echo "serving artifact $$(cat artifacts/latest) (remove artifacts/ to retrain)"; fi
	$(BIN)/python -m loadtest.quickstart

# the coverage report (in-process code; the uvicorn subprocesses of the e2e tests are not
# traced) prints after the test summary
test: install
	$(BIN)/python -m pytest -q --cov --cov-report=term

bench: install
	$(BIN)/ifa-rank bench

loadtest: install
	$(BIN)/python -m loadtest.run

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ifa_common ifa_rank service model_export loadtest tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
