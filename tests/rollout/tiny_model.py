"""A tiny real Hugging Face Llama + word-level tokenizer, saved to disk for the rollout tests."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
EOS = 2
# Two-letter words: no word is a substring of another word, so stop strings match exactly.
WORDS = ["".join(p) for p in itertools.product("abcdefgh", repeat=2)][:60]
EOS_PROBE_PROMPT = [4, 9, 13, 22]


@dataclass
class TinyModel:
    path: str
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    extra_eos: int
    """A second EOS id (in generation_config) that greedy decoding of EOS_PROBE_PROMPT emits."""
    extra_eos_index: int
    """Where in that greedy continuation it first appears."""


def make_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
              max_position_embeddings=4096, initializer_range=0.5)  # 0.5: peaked, varied next-token choices
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")


def greedy_hf(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face's own greedy generate on one unpadded prompt; new tokens only."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def build_tiny_model(path: str, seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config()).eval()
    tokenizer = make_tokenizer()
    # Pick a token greedy decoding of the probe prompt reaches at index >= 2 and not before, and
    # make it a second EOS, so EOS handling is exercised on a model we did not train.
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, bos_token_id=1)
    cont = greedy_hf(model, EOS_PROBE_PROMPT, 12)
    index = next(i for i in range(2, len(cont)) if cont[i] not in cont[:i] and cont[i] != EOS and EOS not in cont[:i])
    extra = cont[index]
    model.generation_config = GenerationConfig(eos_token_id=[EOS, extra], pad_token_id=0, bos_token_id=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TinyModel(path=path, model=model, tokenizer=tokenizer, extra_eos=extra, extra_eos_index=index)


def float64_copy(model):
    """An independent float64 copy of `model`: the reference for numeric checks."""
    import copy

    return copy.deepcopy(model).double().eval()


def reference_logits(model64, sequence: list[int]) -> torch.Tensor:
    """Logits [len, vocab] (float64) over one unpadded sequence."""
    with torch.no_grad():
        return model64(torch.tensor([sequence])).logits[0]
