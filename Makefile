# Two commands set everything up on a fresh machine:
#   make demo   generate music from the bundled example image and a prompt
#   make test   run the test suite
# Both create .venv and install melfusion (editable; make test with the dev extra: test tools, gradio, playwright
# and Debian's chromium for the browser test) when it is missing. The install
# uses uv (parallel downloads and unpacking; pip is the fallback) and leaves byte-compiling to the first
# import, which keeps a fresh `make demo` under a minute. uv does not read pip's configuration, so
# pip's find-links (where a local torch wheel may live) are handed on to it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.melfusion-installed
BASE_STAMP := $(VENV)/.melfusion-base-installed
OUT    ?= outputs

export HF_HUB_OFFLINE := 1
UV_FIND_LINKS ?= $(shell echo "$$PIP_FIND_LINKS" | tr ' ' ',')

.PHONY: demo test test-slow lint install clean browser screenshots

# install melfusion with the extras EXTRA names (empty: the package alone)
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv && UV_FIND_LINKS="$(UV_FIND_LINKS)" $(VENV)/bin/uv pip install --quiet \
		--python $(PY) -c constraints-dev.txt -e ".$(1)" \
		|| $(PY) -m pip install --quiet --no-compile -c constraints-dev.txt -e ".$(1)"
endef

$(STAMP): pyproject.toml constraints-dev.txt
	$(call install,[dev])
	touch $(STAMP) $(BASE_STAMP)

# make demo needs only the package (not the test tools, gradio or playwright): a fresh clone's demo stays fast
$(BASE_STAMP): pyproject.toml constraints-dev.txt
	$(call install,)
	touch $(BASE_STAMP)

install: $(STAMP)

demo: $(if $(wildcard $(STAMP)),$(STAMP),$(BASE_STAMP))
	$(VENV)/bin/melfusion generate --image examples/images/blue-bright.png \
		--text "a calm flute melody" --out $(OUT)/demo.wav --spectrogram $(OUT)/demo.png --overwrite

# the browser test's Chromium, from Debian's packages; where it cannot be installed (no root, no apt-get) the
# test is skipped and `-rs` prints why
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$MELFUSION_CHROMIUM" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test (tests/test_app_browser.py)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "no chromium and no apt-get as root: the browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# the app's pictures in docs/app.md, taken by the browser test
screenshots: $(STAMP) browser
	MELFUSION_SCREENSHOTS=docs/images $(PY) -m pytest -q -rs tests/test_app_browser.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks scripts

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
