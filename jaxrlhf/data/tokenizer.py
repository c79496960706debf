"""A character-level HF tokenizer built locally, for toy runs and tests with no download.

It is a real `transformers.PreTrainedTokenizerFast`: `save_pretrained` writes it next to a model
and `AutoTokenizer.from_pretrained` reads it back, exactly like a hub tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
DEFAULT_CHARS = string.digits + "+-*/=()., ?:" + string.ascii_lowercase + string.ascii_uppercase

# A minimal chat template so `apply_chat_template` works on toy data: user text, then answer.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """One token per character of ``chars``, plus <pad>=0, <eos>=1, <bos>=2, <unk>=3."""
    if len(set(chars)) != len(chars):
        raise ValueError("build_char_tokenizer: chars contains duplicates.")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
