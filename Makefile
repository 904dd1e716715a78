# Two commands do everything on a fresh machine:
#   make demo   create .venv, install (pinned), train configs/tiny.yaml on data/philosophy.txt (a new run each
#               time: --overwrite true replaces the previous demo run), print a sample
#   make test   create .venv, install with test extras (pinned), run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

demo: install
	$(BIN)/picogpt fit --config configs/tiny.yaml --trainer.accelerator cpu --overwrite true
	$(BIN)/picogpt sample --ckpt checkpoints/tiny/best.ckpt --prompt "Q: What is knowledge?\nA:" \
		--max_new_tokens 120 --device cpu --stop "Q:"

test: install-test
	$(BIN)/python -m pytest -q

install: $(BIN)/.installed
install-test: $(BIN)/.installed-test

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

# The oldest transformers the test extra allows goes beside the venv's packages, not into them (it needs older
# tokenizers and huggingface_hub): tests/test_export.py runs it in a subprocess.
$(BIN)/.installed-test: $(BIN)/.installed constraints-oldest-transformers.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/transformers-oldest \
		-r constraints-oldest-transformers.txt
	touch $@

clean:
	rm -rf $(VENV) checkpoints data/prepared
