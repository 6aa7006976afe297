# Two commands do everything on a fresh clone (only python3 >= 3.10 and make needed):
#   make figures   regenerate every figure and the Table-1 analogue into figures/ (the main job)
#   make test      lint, then the test suite (what .ci/run runs)
# Others: make lm (the Section-7 study alone), make benchmarks (the performance suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.test-installed-$(shell cat requirements-test.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: figures lm test lint benchmarks venv clean

venv: $(STAMP)

# The pinned requirements, then the package itself, editable (console scripts alignment-geom-run and
# alignment-geom-figures; `python -m experiments.run` works from the repository root).
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job: the nine scaling-law figures, the defences landscape study, then the Section-7 transformer study
# (figures 10-11, Table 1), one loop over the study registry. Exit status 1 if any study fails or disagrees with its expected number.
figures: $(STAMP)
	$(BIN)/python -m experiments.figures --outdir=figures

# Section 7 on a small transformer alone (figures 10-11, the Table-1 analogue).
lm: $(STAMP)
	$(BIN)/python -m experiments.figures --outdir=figures --only=lm_table1

$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
	rm -f $(VENV)/.test-installed-*
	touch $(TEST_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --timeout=600 --durations=25 $(PYTEST_ARGS) tests

benchmarks: $(TEST_STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
