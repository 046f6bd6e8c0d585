# The two commands of the README: `make demo` and `make test`. Both work from a fresh clone:
# they create .venv (if absent), install torch 2.13.0 only when no torch is importable there
# (never letting pip pick a CUDA build), build stp_fast with its C++ extension, then run.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stp_fast-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test install bench lint clean gpu-check

# The main job on the embedded default data set (scikit-learn's digits): STP-train resnet20, search
# a subnet with 15% of the MACs, extract it, recalibrate BN, evaluate -- no fine-tuning. Writes a new
# runs/prune-resnet20-digits[-N]/ each time and ends with the dense-vs-pruned table.
demo: $(STAMP)
	$(VENV)/bin/stp-fast prune --model resnet20 --dataset digits --flops-target 0.15

test: $(STAMP)
	STP_FAST_REQUIRE_EXT=1 $(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "torch already importable: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PIP) install torch==2.13.0; \
	fi
	$(PIP) install "setuptools>=64" wheel ninja
	$(PIP) install --no-build-isolation -e ".[test]"
	@touch $(STAMP)

# The one-shot GPU check (benchmarks/gpu_check.sh): build for the present GPU, the GPU test suites, checks
# and timings -> gpu_check_out/summary.json.  No set-up step: it runs offline with the torch already there
# (PYTHON=... picks the interpreter).  Without a GPU it runs its quick CPU mode.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

bench: $(STAMP)
	$(PY) -m pytest benchmarks -m benchmark -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check stp_fast tests benchmarks setup.py

clean:
	rm -rf build dist *.egg-info stp_fast/_C*.so stp_fast/_build_info.json $(STAMP)
