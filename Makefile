# The two entry points of the README: `make demo` and `make test`.
# Both install what they need: Debian packages (as root) and a virtual environment.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := fuse3 libfuse3-dev pkg-config gcc runsc busybox-static casync rclone

.PHONY: demo test check lint typecheck unit system-deps criu install bench clean

demo: install
	$(BIN)/python -m examples.demo

test: install lint typecheck unit

unit:
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

install: system-deps criu $(VENV)/.installed

# CRIU >= 4 as build/criu/criu: Debian's package where it is new enough, else built from
# Debian's source package (native/criu.sh says how).
criu:
	bash native/criu.sh

# An editable install leaves no bytecode, and PYTHONDONTWRITEBYTECODE would keep every
# command compiling the package anew: compile it once, as a wheel install does.
$(VENV)/.installed: pyproject.toml setup.py native/uffd_loader.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -m compileall -q snapstore fusefs examples benchmarks
	touch $@

system-deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench: install
	$(BIN)/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) build *.egg-info snapstore/_native/uffd_loader
