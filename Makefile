# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint typecheck pytest docs bench fuzz mutate install install-dev clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so no range below can pull a multi-GB CUDA build.
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[report]"
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[report,dev,tensorboard,lightning,transformers,wandb,mlflow,docs]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.dev

demo: $(VENV)/.installed
	$(VENV)/bin/gradguard demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

# Hypothesis is derandomized here (profile "ci" in tests/conftest.py): the same examples every run.
pytest: $(VENV)/.dev
	$(PY) -m pytest -n 2 -p no:cacheprovider tests

# Wide, random fuzzing of every hypothesis test (profile "fuzz": random examples, no database),
# FUZZ_ROUNDS times over, each round drawing new examples: for finding bugs, not for CI. No
# per-test time limit: ten times the programs of `make test` run for many minutes.
FUZZ_ROUNDS ?= 10
fuzz: $(VENV)/.dev
	for i in $$(seq $(FUZZ_ROUNDS)); do \
		HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -n 2 -q -p no:cacheprovider --timeout=0 \
			$$(grep -l hypothesis tests/test_*.py) || exit 1; \
	done

# Mutation testing of the decision core (docs/mutation.md); not part of `make test`. mutmut
# changes one operator, constant or call at a time in the modules [tool.mutmut] lists and runs
# the focused tests that call the changed function: a mutant no test fails on is a rule no test
# pins. Fresh each time, one worker and one intra-op thread (a few cores are usually busy with
# other work; MUTATE_JOBS=2 on cores of your own), hypothesis derandomized (profile "ci"): the
# same code gives the same verdicts. MUTANTS="gradguard.guard.response*" runs a subset (the
# score then counts those); MUTATE_MIN=95 fails the target below 95 %.
MUTATE_JOBS ?= 1
mutate: $(VENV)/.dev
	rm -rf mutants
	OMP_NUM_THREADS=1 HYPOTHESIS_PROFILE=ci $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) \
		$(MUTANTS)
	$(PY) scripts/mutation_report.py --json mutants/score.json \
		$(if $(MUTATE_MIN),--min-score $(MUTATE_MIN))

# The documentation site, API reference included, into build/site. --strict: a broken link or
# anchor, a page missing from the nav or a docstring griffe cannot read fails the build.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: browser lint typecheck docs pytest

bench: $(VENV)/.dev
	$(PIP) install -q -e ".[peers]"
	# One intra-op thread: on a few cores shared with other work a descheduled worker thread makes
	# every large kernel, ours and torch's alike, swing 5-10x (see docs/benchmarks.md).
	# ONLY="small ops" reruns those sections and keeps the page's others; BENCH_FLAGS=--quick.
	$(PY) benchmarks/run.py --threads 1 --out docs/benchmarks.md $(BENCH_FLAGS) \
		$(if $(ONLY),--only $(ONLY))

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache

# The HTML report is checked in a real headless Chromium (Debian's package), installed once.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
