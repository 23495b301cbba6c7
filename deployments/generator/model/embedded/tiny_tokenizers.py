"""The embedded models' tokenizers, built offline from vocabularies written here.

No hub, so no trained vocabulary: each tokenizer is the real class over a tiny vocabulary in
which every string still tokenizes (byte-level characters, or T5's characters and word
starts), with no merges. The Qwen ones take the chat templates their pipelines render a
prompt with.
"""

from __future__ import annotations

import string

CLIP_VOCAB_SIZE = 1000
T5_VOCAB_SIZE = 200

# A chat turn and the assistant's turn opened (Z-Image's pipeline asks with thinking on).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's: with thinking off (FLUX.2 Klein's pipeline asks so), the assistant's turn opens
# with an empty thought.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for the 256 byte values."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def clip_tokenizer():
    """A CLIP BPE tokenizer over a byte-level vocabulary: every string tokenizes, no merges."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in byte_level_alphabet():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    assert len(vocab) <= CLIP_VOCAB_SIZE
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A T5 Unigram tokenizer over a small vocabulary of characters and word starts."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in string.ascii_lowercase + string.ascii_uppercase + string.digits:
        pieces.append(("▁" + char, -3.0))
        pieces.append((char, -4.0))
    for char in string.punctuation:
        pieces.append((char, -5.0))
    assert len(pieces) <= T5_VOCAB_SIZE
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=256)


def qwen_tokenizer(chat_template: str | None = None):
    """A Qwen2 byte-level BPE tokenizer with no merges, and the chat template's markers as
    special tokens: every string tokenizes. `chat_template`: for a pipeline that renders its
    prompts as a chat turn."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(byte_level_alphabet())}
    markers = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab.update({marker: len(vocab) + i for i, marker in enumerate(markers)})
    # Room for the vision tower's three token ids at the end of the vocabulary.
    vocab.update({f"<|vision_{i}|>": len(vocab) + i for i in range(3)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=markers[1:],
        model_max_length=1024,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
