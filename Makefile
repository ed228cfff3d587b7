# The two commands a newcomer needs (see README.md):
#   make demo   install, then pack 1,000 identities in 512-d on the CPU (no downloads)
#   make test   install, then run the whole test suite
PYTHON ?= python3

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	hyperface pack --identities 1000 --dim 512 --time-budget 30 --seed 0 --out runs/pack-demo --overwrite

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/pack.py
