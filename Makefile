# Two commands do everything: `make run` (the daemon with the shipped model) and `make test` (the whole suite).
# Each sets itself up on a fresh Debian machine with Python 3.11 and is idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := jackd2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test model venv venv-runtime sysdeps bench clean

# Runtime only (mido, python-rtmidi, onnxruntime, numpy): what the daemon needs.
$(VENV)/.runtime-stamp: pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# Everything: training (TensorFlow, tf2onnx, music21...) and test tools.
$(VENV)/.all-stamp: pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $(VENV)/.runtime-stamp $@

venv-runtime: $(VENV)/.runtime-stamp
venv: $(VENV)/.all-stamp

# JACK gives the end-to-end tests real MIDI ports without a sound card.
sysdeps:
	@if ! command -v jackd >/dev/null 2>&1 || ! command -v jack_midi_dump >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

run: venv-runtime
	$(VENV)/bin/improvd run

test: sysdeps venv
	$(PY) -m pytest -q -rxX -p no:cacheprovider

# Rebuild the shipped model from a clean checkout: the default preset on the Bach chorales, seeded, 15 minutes.
model: venv
	$(VENV)/bin/improvd train --corpus bach --preset default --max-minutes 15 --out runs/bach-default --no-progress
	$(VENV)/bin/improvd export runs/bach-default --out models/bach.onnx --format window
	cp runs/bach-default/model.keras models/bach.keras  # the weights `improvd train --init shipped` starts from
	$(PY) -c "import json,onnx; m=onnx.load('models/bach.onnx'); \
		card=json.loads({p.key:p.value for p in m.metadata_props}['improvd.card']); \
		open('models/bach.card.json','w').write(json.dumps(card, indent=2, sort_keys=True)+'\n')"

bench: venv sysdeps
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
