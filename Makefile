# The two entry points of the README. Both set the host up first (idempotent, seconds when done).
PY := /opt/mmshim/venv/bin/python

.PHONY: setup demo test lint bench

setup:
	bash install/setup-host.sh

demo: setup
	$(PY) -m mmshim.demo

test: setup
	$(PY) -m ruff check mmshim tests bench install
	$(PY) -m pytest -v -rs tests

bench: setup
	$(PY) bench/passthrough.py
	$(PY) bench/protection.py
	$(PY) bench/checkpoint.py
	$(PY) bench/layer.py
	$(PY) bench/viewer.py
