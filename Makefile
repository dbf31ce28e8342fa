# Two commands set everything up on a fresh machine:
#   make demo   generate music from the bundled example image and a prompt
#   make test   run the test suite
# Both create .venv and install melfusion (editable, with the dev extra) when it is missing. The install
# uses uv (parallel downloads and unpacking; pip is the fallback) and leaves byte-compiling to the first
# import, which keeps a fresh `make demo` under a minute. uv does not read pip's configuration, so
# pip's find-links (where a local torch wheel may live) are handed on to it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.melfusion-installed
OUT    ?= outputs

export HF_HUB_OFFLINE := 1
UV_FIND_LINKS ?= $(shell echo "$$PIP_FIND_LINKS" | tr ' ' ',')

.PHONY: demo test test-slow lint install clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv && UV_FIND_LINKS="$(UV_FIND_LINKS)" $(VENV)/bin/uv pip install --quiet \
		--python $(PY) -c constraints-dev.txt -e ".[dev]" \
		|| $(PY) -m pip install --quiet --no-compile -c constraints-dev.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/melfusion generate --image examples/images/blue-bright.png \
		--text "a calm flute melody" --out $(OUT)/demo.wav --spectrogram $(OUT)/demo.png --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks scripts

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
