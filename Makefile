# Two commands do everything on a fresh machine:
#   make demo   create .venv, install (pinned), train configs/tiny.yaml on data/philosophy.txt, print a sample
#   make test   create .venv, install with test extras (pinned), run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

demo: install
	$(BIN)/picogpt fit --config configs/tiny.yaml --trainer.accelerator cpu
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

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) checkpoints data/prepared
