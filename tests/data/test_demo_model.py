import collections
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from erc_megatron.cli import main as cli_main
from erc_megatron.data.demo_model import DemoModelConfig, WarmupConfig, build_model, make_demo
from erc_megatron.data.demo_tokenizer import build_tokenizer, save_tokenizer
from erc_megatron.data.prompts import DataConfig, load_prompt_dataset
from erc_megatron.data.synthetic import AdditionTaskConfig
from erc_megatron.model.config import ConfigError, ModelConfig
from erc_megatron.reward.math_reward import extract_boxed, math_reward


@torch.no_grad()
def _greedy_no_cache(model, prompt_ids, eos_id, max_new_tokens=8):
    """Reference decoding: one full forward per token, no KV cache, no padding."""
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos_id:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # Default model and warm-up recipe, fewer rows in train.jsonl and fewer eval samples.
    rc = cli_main(["make-demo-model", "--out", str(out), "--num-train", "500", "--eval-samples", "4", "--seed", "0"])
    assert rc == 0
    return str(out)


def test_files_and_summary(demo_dir):
    for rel in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json",
                "model/generation_config.json", "train.jsonl", "val.jsonl", "demo_summary.json"):
        assert os.path.isfile(os.path.join(demo_dir, rel)), rel
    with open(os.path.join(demo_dir, "train.jsonl")) as f:
        train = [json.loads(line) for line in f]
    with open(os.path.join(demo_dir, "val.jsonl")) as f:
        val = [json.loads(line) for line in f]
    assert len(train) == 500 and len(val) == 80
    assert {r["prompt"][0]["content"] for r in train}.isdisjoint({r["prompt"][0]["content"] for r in val})
    summary = json.load(open(os.path.join(demo_dir, "demo_summary.json")))
    assert summary["warmup"]["noise"] == 0.7 and summary["vocab_size"] < 64


def test_tokenizer_round_trip_and_chat_template(demo_dir):
    # The directory holds a qwen2 config, so transformers 5 loads the tokenizer as Qwen2Tokenizer,
    # rebuilt from vocabulary and merges only: it must still tokenise exactly like the original.
    tok = AutoTokenizer.from_pretrained(os.path.join(demo_dir, "model"))
    fresh = build_tokenizer()
    assert len(tok) == len(fresh) < 64 and tok.get_vocab() == fresh.get_vocab()
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "<|end|>", "<pad>", "<unk>")
    for s in ["12+7=", "\\boxed{19}", "3 + 5 = ?\n\\boxed{-8}", "<think>1+2</think>\\boxed{3}", "(1,2):3.5*4/{}"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert ids == fresh(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
        # one token per character, except the added words
        assert len(ids) == len(s) - sum(s.count(w) * (len(w) - 1) for w in ("\\boxed{", "<think>", "</think>"))
    assert tok.convert_ids_to_tokens(tok("\\boxed{19}", add_special_tokens=False)["input_ids"]) == \
        ["\\boxed{", "1", "9", "}"]
    text = tok.apply_chat_template([{"role": "user", "content": "2+3="}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>2+3=<|end|><|assistant|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == fresh(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok(text + "\\boxed{5}<|end|>")["input_ids"], skip_special_tokens=True) == "2+3=\\boxed{5}"


def test_model_loads_generates_and_accuracy_uses_math_reward(demo_dir):
    model_dir = os.path.join(demo_dir, "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None        # Qwen2: qkv bias
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    # the Megatron side reads the same config
    mcfg = ModelConfig.from_hf_config(model.config)
    assert mcfg.add_qkv_bias and mcfg.untie_embeddings_and_output_weights and mcfg.vocab_size == len(tok)

    summary = json.load(open(os.path.join(demo_dir, "demo_summary.json")))
    val = load_prompt_dataset(os.path.join(demo_dir, "val.jsonl"), DataConfig(), tok)
    responses = [tok.decode(_greedy_no_cache(model, item["prompt_ids"], tok.eos_token_id)) for item in val]
    scores = [math_reward(r, item["answer"]) for r, item in zip(responses, val)]
    assert set(scores) <= {1.0, -1.0}
    assert sum(s > 0 for s in scores) / len(scores) == pytest.approx(summary["accuracy"]["val_greedy"])

    # The warm start is in the regime RL needs: right answers sometimes, and the systematic +1
    # error as the mode (greedy is mostly wrong), so sampled groups mix rewards.
    acc = summary["accuracy"]
    assert 0.1 <= acc["val_sampled"] <= 0.5, acc
    assert acc["val_greedy"] < acc["val_sampled"] + 0.1, acc
    offsets = collections.Counter(int(extract_boxed(r)) - int(item["answer"]) for r, item in zip(responses, val)
                                  if (extract_boxed(r) or "").isdigit())
    assert offsets[1] >= 0.6 * len(val), offsets

    # HF generate works on the saved model (the path the rollout server's reference uses)
    out = model.generate(input_ids=torch.tensor([val[0]["prompt_ids"]]), max_new_tokens=6, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > len(val[0]["prompt_ids"])


def _tiny_run(out, seed):
    return make_demo(str(out), DemoModelConfig(), AdditionTaskConfig(max_operand=9, num_train=100, seed=seed),
                     WarmupConfig(steps=10, batch_size=16, eval_samples=1, seed=seed), log=lambda *a: None)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_deterministic_in_seed(tmp_path):
    a, b, c = _tiny_run(tmp_path / "a", 1), _tiny_run(tmp_path / "b", 1), _tiny_run(tmp_path / "c", 2)
    for rel in ("model/model.safetensors", "train.jsonl", "val.jsonl"):
        assert _read(tmp_path / "a" / rel) == _read(tmp_path / "b" / rel), rel
        assert _read(tmp_path / "a" / rel) != _read(tmp_path / "c" / rel), rel
    assert a["accuracy"] == b["accuracy"]


def test_llama_tied_variant_saves_and_loads(tmp_path):
    tok = build_tokenizer()
    model = build_model(DemoModelConfig(architecture="llama", tie_word_embeddings=True, num_layers=4), tok, seed=0)
    model.save_pretrained(tmp_path)
    save_tokenizer(tok, str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.num_hidden_layers == 4
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.layers[0].self_attn.q_proj.bias is None
    ids = torch.tensor([[tok.bos_token_id, 5, 10]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert not ModelConfig.from_hf_config(loaded.config).untie_embeddings_and_output_weights


@pytest.mark.parametrize("cls, kwargs, needle", [
    (DemoModelConfig, dict(architecture="gpt2"), "model.architecture must be one of"),
    (DemoModelConfig, dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (DemoModelConfig, dict(hidden_size=66), "divisible by model.num_attention_heads"),
    (WarmupConfig, dict(noise=1.5), "warmup.noise must be in"),
    (WarmupConfig, dict(noise_offsets=(0,)), "warmup.noise_offsets"),
    (WarmupConfig, dict(lr=0.0), "warmup.lr"),
])
def test_config_validation(cls, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        cls(**kwargs)


def test_cli_rejects_bad_offsets(tmp_path):
    with pytest.raises(ConfigError, match="--noise-offsets"):
        cli_main(["make-demo-model", "--out", str(tmp_path), "--noise-offsets", "1,x"])
