# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= speedy,mpi,test,dev
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
STAMP := $(VENV)/.installed
# strict editable installs map each module file: re-install when a module is added or removed
SOURCES := $(sort $(wildcard wind_bmi/*.py wind_bmi/*/*.py model/*.py coupling/*.py))

.PHONY: install demo test lint bench clean cf-checker

# The CF checker's tables, offline: the CF standard-name table from the compliance-checker wheel (PyPI),
# and libudunits2 from Debian (root only; without it the CF-checker test skips and says why).
CF_TABLES := $(VENV)/cf-tables/cf-standard-name-table.xml

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so no dependency range pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	touch $(TORCH_STAMP)

$(STAMP): $(TORCH_STAMP) pyproject.toml $(SOURCES)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]" --config-settings editable_mode=strict
	touch $(STAMP)

install: $(STAMP)

$(CF_TABLES): $(TORCH_STAMP)
	mkdir -p $(VENV)/cf-tables
	$(BIN)/pip download --quiet --no-deps compliance-checker==6.1.0 -d $(VENV)/cf-tables
	$(BIN)/python -c "import glob, zipfile; w = glob.glob('$(VENV)/cf-tables/compliance_checker-*.whl')[0]; \
		open('$(CF_TABLES)', 'wb').write(zipfile.ZipFile(w).read('compliance_checker/data/cf-standard-name-table.xml'))"

cf-checker: $(CF_TABLES)
	@ldconfig -p | grep -q libudunits2 || (command -v apt-get > /dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -qq libudunits2-0 > /dev/null 2>&1 || \
		 (apt-get update -qq > /dev/null 2>&1 && apt-get install -y -qq libudunits2-0 > /dev/null 2>&1))) || \
		echo "libudunits2 not installed: the CF-checker test will be skipped"

demo: $(STAMP)
	$(BIN)/wind-bmi run config/demo.yaml --out out/demo

lint: $(STAMP)
	$(BIN)/ruff check wind_bmi model coupling tests examples
	$(BIN)/mypy -p wind_bmi -p wind_bmi.model -p wind_bmi.coupling

test: $(STAMP) lint cf-checker
	$(BIN)/pytest -q tests
	$(BIN)/bmi-test wind_bmi:WindBmi --quiet
	$(BIN)/bmi-test wind_bmi:WindBmi --config-file=$(CURDIR)/config/bmi_test.yaml --root-dir=$(CURDIR)/config --quiet

bench: $(STAMP)
	$(BIN)/wind-bmi bench --out out/bench

clean:
	rm -rf $(VENV) out build *.egg-info
