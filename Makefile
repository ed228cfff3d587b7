# The two commands a newcomer needs (see README.md):
#   make demo   install, then pack 10,000 identities in 512-d for 60 s on the CPU (no downloads)
#   make test   install, then run the whole test suite
PYTHON ?= python3

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) -m hyperface pack --identities 10000 --dim 512 --time-budget 60 --seed 0 --device cpu --out runs/pack-demo --overwrite

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/pack.py
