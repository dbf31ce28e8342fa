# Two commands set everything up on a fresh machine:
#   make demo   generate music from the bundled example image and a prompt
#   make test   run the test suite
# Both create .venv and install melfusion (editable, with the dev extra) when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.melfusion-installed
OUT    ?= outputs

export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow lint install clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/melfusion generate --image examples/images/blue-bright.png \
		--text "a calm flute melody" --out $(OUT)/demo.wav --spectrogram $(OUT)/demo.png

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks scripts

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
