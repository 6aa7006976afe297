# Two commands do everything on a fresh clone (only python3 >= 3.10 and make needed):
#   make figures   regenerate the figures into figures/ (the main job)
#   make test      run the test suite (what .ci/run runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
RUN := PYTHONPATH=$(CURDIR) $(BIN)/python
PYTEST_ARGS ?=

.PHONY: figures test benchmarks venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

figures: $(STAMP)
	$(RUN) -m experiments.figures --outdir=figures

test: $(STAMP)
	$(RUN) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS) tests

benchmarks: $(STAMP)
	$(RUN) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
