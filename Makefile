# dlopt-labs: set-up, run and test. `make lab` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
TORCH := torch==2.13.0
CH ?= 15
MODE ?=
SITE_PORT ?= 8000
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PORT ?= 8888

.PHONY: setup lab test run bench stress readme export site serve system-deps browser-deps clean

setup: $(STAMP)  ## create .venv and install the pinned CPU torch and everything else (idempotent)

$(STAMP): settings.ini setup.py site/package.json site/package-lock.json
	@command -v npm >/dev/null || { echo "npm is needed for the site's JavaScript: apt-get install -y nodejs npm"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	cd site && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	@$(BIN)/python -c "import torch, dlopt_labs; print('set up: torch', torch.__version__, '| dlopt_labs', dlopt_labs.__version__)"
	@touch $(STAMP)

lab: setup  ## open JupyterLab on the course home page
	cd nbs && DLOPT_PROGRESS=1 ../$(BIN)/jupyter lab --ip=127.0.0.1 --port=$(PORT) $(ROOT_FLAG) index.ipynb

system-deps:  ## Debian's Chromium and a CJK font (browser tests), bubblewrap (the grader's sandbox); installed when missing
	@command -v chromium >/dev/null && command -v bwrap >/dev/null && fc-list 2>/dev/null | grep -qi "wenquanyi" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei bubblewrap >/dev/null; }

browser-deps: system-deps

test: setup system-deps  ## the whole test suite (also fails when notebooks and library are out of sync)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -q --durations=25

run: setup  ## run one chapter: make run CH=15 [MODE=smoke]
	$(BIN)/dlopt-labs run $(CH) --mode $(or $(MODE),full)

site: setup  ## execute every written chapter (MODE=smoke by default, MODE=full for the course) and render _site/
	OMP_NUM_THREADS=1 $(BIN)/dlopt-labs site --mode $(or $(MODE),smoke)

serve:  ## serve _site/ on 127.0.0.1
	@test -f _site/index.html || { echo "no _site/ yet: run make site"; exit 1; }
	$(BIN)/python -m http.server $(SITE_PORT) --bind 127.0.0.1 --directory _site

stress: setup  ## one chapter run 30 times, 3 at a time, stalled kernels dumped with py-spy: make stress CH=15
	OMP_NUM_THREADS=1 $(BIN)/python tests/stress_kernels.py --chapter $(CH) --runs 30 --workers 3

bench: setup  ## fit()'s overhead over a plain PyTorch loop; activation checkpointing's memory and time (ch17); ch03 and ch10's explainers against shap, scikit-learn and captum; int8 and ONNX Runtime throughput (ch06); dynamic batching and worker processes (ch18); DP-SGD against Opacus and vmap against a loop (ch13); side by side
	$(BIN)/python tests/bench_fit.py
	$(BIN)/python tests/bench_memory.py
	$(BIN)/python tests/bench_explain.py
	$(BIN)/python tests/bench_inference.py
	$(BIN)/python tests/bench_parallel.py
	$(BIN)/python tests/bench_privacy.py

readme: setup  ## regenerate README.md from nbs/index.ipynb
	$(BIN)/python -c "from dlopt_labs.course.site import write_readme; write_readme()"

export: setup  ## notebooks -> library, clean notebooks, README, _quarto.yml
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(MAKE) -s readme && $(BIN)/python -c "from dlopt_labs.course.chapters import write_quarto; write_quarto()"

clean:
	rm -rf _runs _results _build _site
