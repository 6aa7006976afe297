# Two commands do everything on a fresh clone (only python3 >= 3.10 and make needed):
#   make figures   regenerate the figures into figures/ (the main job)
#   make lm        only the Section-7 transformer part of it (figures 10-11, Table-1 analogue)
#   make test      run the test suite (what .ci/run runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
RUN := PYTHONPATH=$(CURDIR) $(BIN)/python
PYTEST_ARGS ?=

.PHONY: figures lm test benchmarks venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job: the nine scaling-law figures (~1 min), then the Section-7 transformer reproduction
# (figures 10-11 and the Table-1 analogue, ~4 min), both on 2 CPU cores. Exit status 1 if either fails.
figures: $(STAMP)
	@status=0; \
	$(RUN) -m experiments.figures --outdir=figures || status=$$?; \
	$(MAKE) --no-print-directory lm || status=$$?; \
	exit $$status

# Section 7 on a small transformer alone (figures 10-11, the Table-1 analogue): ~4 min on 2 CPU cores.
lm: $(STAMP)
	$(RUN) -m experiments.run --config=configs/lm_table1.py --workdir=figures/lm_table1 --overwrite
	cp figures/lm_table1/fig10_fisher_spectrum.png figures/lm_table1/fig11_table1.png \
	   figures/lm_table1/table1.md figures/lm_table1/table1.csv figures/

test: $(STAMP)
	$(RUN) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS) tests

benchmarks: $(STAMP)
	$(RUN) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
