"""A small real tokenizer built in-process (no hub): byte-level BPE with a ChatML chat template.

Byte-level BPE covers every string, so any test text tokenises; the vocabulary is trained on a few
sentences, so common words become single tokens and the rest falls back to bytes.
"""

from __future__ import annotations

import functools

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "hello world, how are you today?",
    "I am fine, thank you. What is AI?",
    "Artificial intelligence is the branch of science that builds machines that think.",
    "Below is an instruction that describes a task. Write a response.",
    "### Instruction: ### Input: ### Response:",
    "user assistant system",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_tokenizer(chat_template: str | None = CHATML):
    """A fresh PreTrainedTokenizerFast: eos `<|im_end|>`, pad `<|endoftext|>`, no BOS."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer_object().__class__.from_str(
        _tokenizer_object().to_str()), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok
