"""Test-session set-up shared by every test module.

Triton's interpreter (TRITON_INTERPRET=1) runs the Triton kernels on CPU tensors. Triton reads
the variable when it is first imported, and torch may import it early (e.g. for torch.compile),
so without CUDA it is set here, before any test module loads. It only changes which Triton is
used: qlora's backend dispatch sends CPU tensors to the native kernels unless QLORA_BACKEND
forces triton (tests/test_triton.py does).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def offline(monkeypatch):
    """No hub: `datasets` and `huggingface_hub` fail fast instead of trying the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    """The small in-process ChatML tokenizer of `helpers_tokenizer` (one per test module)."""
    from helpers_tokenizer import make_tokenizer

    return make_tokenizer()
