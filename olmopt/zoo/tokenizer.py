"""The zoo's character-level tokenizer: one id per character,
a chat template, saved as a standard HF tokenizer.

transformers 5 loads some architectures' tokenizers through their own class whatever
tokenizer_config.json declares: a qwen2 directory through ``Qwen2Tokenizer``, which rebuilds a
byte-level BPE from the vocabulary (a space is the token ``Ġ``, a newline ``Ċ``) and so dropped the
plain " " and "\n" tokens. For those architectures (``BYTE_LEVEL_ARCHS``) the vocabulary spells
characters byte-level, with a byte-level pre-tokenizer and decoder: every architecture's tokenizer
gives the same ids for the same text, however it is loaded.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " \n"

# <s><|user|>{prompt}<|assistant|>{answer}</s>; a system turn, when present, is <|system|>{text}.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# architectures whose tokenizer transformers rebuilds as a byte-level BPE from the vocabulary
BYTE_LEVEL_ARCHS = frozenset({"qwen2"})


def byte_level_char(char: str) -> str:
    """GPT-2's printable stand-in for a one-byte character (" " -> "Ġ", "\n" -> "Ċ", "a" -> "a")."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    code = ord(char)
    if code in printable:
        return char
    return chr(256 + sum(1 for b in range(code) if b not in printable))


def build_tokenizer(arch: str = "llama") -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over 96 printable characters plus the chat specials (103 ids).

    The ids are the same for every ``arch``; for ``BYTE_LEVEL_ARCHS`` the vocabulary is spelled byte-level.
    """
    byte_level = arch in BYTE_LEVEL_ARCHS
    chars = [byte_level_char(c) for c in CHARACTERS] if byte_level else list(CHARACTERS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    split = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    if byte_level:
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        core.decoder = decoders.ByteLevel()
    else:
        core.pre_tokenizer = split
        core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
