import json
import logging
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers.processors import TemplateProcessing

from erc_megatron.data.demo_tokenizer import build_tokenizer
from erc_megatron.data.prompts import DataConfig, DataError, PromptDataset, PromptIterator, load_prompt_dataset
from erc_megatron.model.config import ConfigError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _expected_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tok(text, add_special_tokens=False)["input_ids"]


def test_jsonl_strings_and_chat_messages(tmp_path, tok):
    chat = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "2+2="}]
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "3+5=", "answer": "8"},
        "",                                          # blank lines are skipped
        {"prompt": chat, "answer": 4, "other": [1, 2]},
        {"prompt": "1+0.5=", "answer": 1.5},
    ])
    ds = load_prompt_dataset(path, DataConfig(), tok)
    assert len(ds) == 3 and ds.num_dropped == 0
    text0, ids0 = _expected_ids(tok, [{"role": "user", "content": "3+5="}])
    assert ds[0] == {"prompt_ids": ids0, "prompt_text": text0, "answer": "8", "index": 0}
    assert text0 == "<s><|user|>3+5=<|end|><|assistant|>"
    assert ids0[0] == tok.bos_token_id and ids0.count(tok.bos_token_id) == 1   # no double BOS
    text1, ids1 = _expected_ids(tok, chat)
    assert (ds[1]["prompt_text"], ds[1]["prompt_ids"], ds[1]["answer"], ds[1]["index"]) == (text1, ids1, "4", 1)
    assert ds[2]["answer"] == "1.5"
    assert [item["index"] for item in ds] == [0, 1, 2]


def test_plain_text_and_system_prompt(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "3+5=", "answer": "8"}])
    plain = load_prompt_dataset(path, DataConfig(apply_chat_template=False), tok)
    assert plain[0]["prompt_text"] == "3+5="
    assert plain[0]["prompt_ids"] == tok.convert_tokens_to_ids(["3", "+", "5", "="])
    # A tokenizer that adds BOS itself (Llama-style) must not get a second one after the template's.
    bos_tok = build_tokenizer()
    bos_tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", bos_tok.bos_token_id)])
    assert bos_tok("3")["input_ids"] == [bos_tok.bos_token_id, tok.convert_tokens_to_ids("3")]
    assert load_prompt_dataset(path, DataConfig(apply_chat_template=False), bos_tok)[0]["prompt_ids"] == \
        [bos_tok.bos_token_id] + plain[0]["prompt_ids"]
    assert load_prompt_dataset(path, DataConfig(), bos_tok)[0]["prompt_ids"] == \
        load_prompt_dataset(path, DataConfig(), tok)[0]["prompt_ids"]
    sys = load_prompt_dataset(path, DataConfig(system_prompt="Be brief."), tok)
    assert sys[0]["prompt_text"] == "<s><|system|>Be brief.<|end|><|user|>3+5=<|end|><|assistant|>"
    chat_path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}])
    with pytest.raises(ConfigError, match="apply_chat_template is false but a prompt is a chat message list"):
        load_prompt_dataset(chat_path, DataConfig(apply_chat_template=False), tok)


def test_parquet_with_nested_keys(tmp_path, tok):
    rows = [{"extra": {"question": [{"role": "user", "content": q}]},
             "reward_model": {"ground_truth": a, "style": "rule"}} for q, a in (("1+2=", "3"), ("4+4=", "8"))]
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = DataConfig(prompt_key="extra.question", answer_key="reward_model.ground_truth")
    ds = load_prompt_dataset(path, cfg, tok)
    assert [item["answer"] for item in ds] == ["3", "8"]
    assert ds[1]["prompt_ids"] == _expected_ids(tok, rows[1]["extra"]["question"])[1]
    # a literal dotted column name wins over nesting
    flat = str(tmp_path / "flat.parquet")
    pq.write_table(pa.Table.from_pylist([{"q.text": "9+0=", "a": "9"}]), flat)
    ds2 = load_prompt_dataset(flat, DataConfig(prompt_key="q.text", answer_key="a"), tok)
    assert ds2[0]["prompt_text"].endswith("<|user|>9+0=<|end|><|assistant|>")


def test_parquet_bad_row_names_row_and_field(tmp_path, tok):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2=", "answer": None},
                                         {"prompt": "1+3=", "answer": "4"}]), path)
    with pytest.raises(DataError) as exc:
        load_prompt_dataset(path, DataConfig(), tok)
    msg = str(exc.value)
    assert path in msg and "row 1" in msg and "'answer'" in msg and "NoneType" in msg


@pytest.mark.parametrize("lines, where, needles", [
    ([{"prompt": "1+1=", "answer": "2"}, "", '{"prompt": "1+2=", "answer": ', {"prompt": "x", "answer": "1"}],
     "line 3", ["invalid JSON"]),
    ([{"prompt": "1+1=", "answer": "2"}, {"question": "1+2=", "answer": "3"}],
     "line 2", ["missing field 'prompt'", "'question'"]),
    ([{"prompt": "1+1=", "reward_model": {"style": "rule"}}],
     "line 1", ["missing field 'reward_model.ground_truth'", "'ground_truth' not in reward_model"]),
    ([{"prompt": 12, "answer": "2"}], "line 1", ["field 'prompt'", "int"]),
    ([{"prompt": "1+1=", "answer": ["2"]}], "line 1", ["field 'answer'", "list"]),
    ([{"prompt": "1+1=", "answer": True}], "line 1", ["field 'answer'", "bool"]),
    ([{"prompt": [{"content": "1+1="}], "answer": "2"}], "line 1", ["field 'prompt' message 0", "'role'"]),
    ([{"prompt": [], "answer": "2"}], "line 1", ["field 'prompt'"]),
    (["[1, 2]"], "line 1", ["JSON object"]),
])
def test_jsonl_bad_rows_name_file_line_and_field(tmp_path, tok, lines, where, needles):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    answer_key = "reward_model.ground_truth" if "reward_model" in str(lines) else "answer"
    with pytest.raises(DataError) as exc:
        load_prompt_dataset(path, DataConfig(answer_key=answer_key), tok)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {where}:"), msg
    for needle in needles:
        assert needle in msg, msg


def test_overlong_prompts_drop_or_error(tmp_path, tok, caplog):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                                {"prompt": "11111111+1=", "answer": "11111112"},
                                                {"prompt": "2+2=", "answer": "4"}])
    short_len = len(_expected_ids(tok, [{"role": "user", "content": "1+1="}])[1])
    with caplog.at_level(logging.WARNING, logger="erc_megatron.data.prompts"):
        ds = load_prompt_dataset(path, DataConfig(max_prompt_length=short_len), tok)
    assert [item["index"] for item in ds] == [0, 2] and ds.num_dropped == 1
    assert "dropped 1 of 3 prompts" in caplog.text
    with pytest.raises(DataError, match=r"line 2: field 'prompt' is \d+ tokens, over data.max_prompt_length"):
        load_prompt_dataset(path, DataConfig(max_prompt_length=short_len, overlong_prompts="error"), tok)
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompt_dataset(path, DataConfig(max_prompt_length=2), tok)


def test_data_config_validation(tmp_path, tok):
    with pytest.raises(ConfigError, match=r"data.train_path must end with one of \('.jsonl', '.parquet'\)"):
        DataConfig(train_path="x.csv")
    with pytest.raises(ConfigError, match="data.overlong_prompts must be one of"):
        DataConfig(overlong_prompts="truncate")
    with pytest.raises(ConfigError, match="data.answer_key"):
        DataConfig(answer_key="a..b")
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        DataConfig(max_prompt_length=0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_dataset(str(tmp_path / "nope.jsonl"), DataConfig(), tok)
    tok_no_template = build_tokenizer()
    tok_no_template.chat_template = None
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    with pytest.raises(ConfigError, match="tokenizer has no chat template"):
        load_prompt_dataset(path, DataConfig(), tok_no_template)


def _dataset(n):
    return PromptDataset([{"prompt_ids": [i], "prompt_text": str(i), "answer": str(i), "index": i} for i in range(n)],
                         "mem")


def _indices(batch):
    return [item["index"] for item in batch]


def test_iterator_epochs_are_permutations_and_reshuffled():
    it = PromptIterator(_dataset(10), shuffle=True, seed=7)
    first, second = _indices(it.next_batch(10)), _indices(it.next_batch(10))
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second and first != list(range(10))
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["offset"] == 10
    # a batch running over the end of an epoch continues into the next one
    it2 = PromptIterator(_dataset(10), shuffle=True, seed=7)
    assert _indices(it2.next_batch(7) + it2.next_batch(7) + it2.next_batch(6)) == first + second
    seq = PromptIterator(_dataset(5), shuffle=False)
    assert _indices(seq.next_batch(12)) == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert _indices(PromptIterator(_dataset(10), seed=8).next_batch(10)) != first


def test_iterator_resume_reproduces_exact_sequence():
    rng = random.Random(0)
    sizes = [rng.randint(1, 9) for _ in range(30)]
    reference = PromptIterator(_dataset(13), seed=3)
    ref_batches = [_indices(reference.next_batch(n)) for n in sizes]
    for cut in (1, 4, 11, 29):
        it = PromptIterator(_dataset(13), seed=3)
        for n in sizes[:cut]:
            it.next_batch(n)
        state = json.loads(json.dumps(it.state_dict()))      # must survive a JSON checkpoint
        resumed = PromptIterator(_dataset(13), seed=999, shuffle=False)   # restored from the state, not the ctor
        resumed.load_state_dict(state)
        assert [_indices(resumed.next_batch(n)) for n in sizes[cut:]] == ref_batches[cut:]


def test_iterator_state_errors():
    state = PromptIterator(_dataset(13)).state_dict()
    with pytest.raises(ValueError, match="saved for a data set of 13 prompts, this one has 12"):
        PromptIterator(_dataset(12)).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        PromptIterator(_dataset(13)).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="impossible position"):
        PromptIterator(_dataset(13)).load_state_dict({**state, "offset": 14})
    with pytest.raises(ValueError, match="n_prompts must be >= 1"):
        PromptIterator(_dataset(3)).next_batch(0)
