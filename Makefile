# make demo | make test | make test-all | make bench | make mutants — each installs what it needs into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= workdirs/demo
TEST_WORKERS ?= 2

.PHONY: install test test-all demo bench mutants clean

# uv installs the same pinned versions as pip, with parallel downloads: seconds, not minutes (the
# test extras are about 2.4 GB); pip stays in the venv for whoever adds packages by hand.
# --compile-bytecode, as pip does: where PYTHONDONTWRITEBYTECODE is set, every process (each CLI run
# and documented command of the tests) would otherwise compile TF's and JAX's modules again.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(PY) -m uv pip install --quiet --compile-bytecode --python $(PY) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# test: what CI runs (tests marked `slow` left out); test-all: every test (BUILD.md, "Tests").
test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=3 \
	  $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -q -rs --durations=25 -m "not slow" tests

test-all: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=3 \
	  $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -q -rs --durations=25 tests

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m experiments.demo --workdir=$(WORKDIR)

bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m experiments.bench.train_step

# Not part of `make test` or CI: slow (each mutation runs its tests in a copy). docs/mutants.md.
mutants: $(STAMP)
	nice -n 10 $(PY) -m experiments.mutants

clean:
	rm -rf $(VENV) workdirs *.egg-info
