"""A tiny byte-level BPE tokenizer for the demo task, built locally with the `tokenizers` library.

It has Qwen2's exact pipeline (NFC, Qwen2's split regex, byte-level pre-tokenizer and decoder,
BPE) with a vocabulary of only the characters arithmetic prompts need and no merges. The reason is
loading: transformers 5 rebuilds any tokenizer that sits next to a `model_type: qwen2` config as
`Qwen2Tokenizer` from the vocabulary and merges alone, discarding the pipeline stored in
`tokenizer.json`; a tokenizer that already is Qwen2-shaped comes out identical whichever class loads
it (Qwen2Tokenizer, the generic fast tokenizer, or a Llama directory's loader).

Every digit and symbol is one token; `\\boxed{`, `<think>` and `</think>` are added (non-special)
tokens, so a correct demo answer is `\\boxed{`, one or two digits, `}`, end of turn. Characters
outside the vocabulary (letters, for instance) are dropped, as Qwen2's loader does for unknown
bytes; the demo task never produces them. The chat template is ChatML-like and ends each turn
with the end-of-sequence token, so generation stops on the token that ends a turn.
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

PAD, BOS, EOS, UNK = "<pad>", "<s>", "<|end|>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS
WORD_TOKENS = ("\\boxed{", "<think>", "</think>")
CHARACTERS = "0123456789+-*/=?.,:(){}\\ \n"
# Qwen2's pre-tokenizer split (also what transformers' Qwen2Tokenizer installs).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_level(char: str) -> str:
    """The byte-level alphabet symbol of a one-byte character (space -> 'Ġ', newline -> 'Ċ')."""
    ((symbol, _),) = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(char)
    return symbol


def build_tokenizer():
    """A `PreTrainedTokenizerFast` with bos/eos/pad/unk and the chat template (< 64 tokens)."""
    from transformers import PreTrainedTokenizerFast

    pieces = list(SPECIAL_TOKENS) + [_byte_level(c) for c in CHARACTERS]
    vocab = {tok: i for i, tok in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_TOKENS])
    # `<unk>` is never produced (the BPE has no unknown token, like Qwen2's); it is declared so that
    # Qwen2Tokenizer does not append its own default `<|endoftext|>` and outgrow the model's vocabulary.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   chat_template=CHAT_TEMPLATE, padding_side="left")


def save_tokenizer(tokenizer, out_dir: str) -> None:
    """save_pretrained, with the class recorded under the name both transformers 4.x and 5.x know."""
    tokenizer.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "chat_template" not in cfg and not os.path.exists(os.path.join(out_dir, "chat_template.jinja")):
        cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
