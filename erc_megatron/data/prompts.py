"""Prompt data sets (JSONL or Parquet) and a resumable prompt iterator.

Each row gives a prompt (a string, or a chat message list `[{"role", "content"}, ...]`) and a
reference answer, under configurable field names; dotted names reach into nested fields
(`reward_model.ground_truth`). A row that cannot be used stops loading with an error naming the
file, the JSONL line (1-based) or Parquet row (0-based) and the field, because a data set that
silently loses rows skews what the run optimises.

Prompts longer than `max_prompt_length` tokens are handled per `overlong_prompts`: "drop" (the
default; the count is logged and kept on the data set as `num_dropped`) or "error". Dropping is
the default because real math sets contain a few pathological prompts that no run wants to fail on,
while the logged count keeps the loss visible.

`PromptIterator` walks the data set in epochs, reshuffled per epoch from (seed, epoch), and its
whole position is three integers plus the seed, so a checkpoint restores the exact sequence.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

from erc_megatron.model.config import ConfigError

logger = logging.getLogger(__name__)

_EXTENSIONS = (".jsonl", ".parquet")
_OVERLONG = ("drop", "error")


@dataclass
class DataConfig:
    """Where the prompts come from and how they become token ids."""

    train_path: str | None = None
    """Training prompts: a .jsonl or .parquet file."""
    val_path: str | None = None
    """Held-out prompts for validation (.jsonl or .parquet); None disables validation."""
    prompt_key: str = "prompt"
    """Field holding the prompt (string or chat message list); dots reach nested fields."""
    answer_key: str = "answer"
    """Field holding the reference answer; dots reach nested fields (e.g. reward_model.ground_truth)."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (add_generation_prompt=True)."""
    system_prompt: str | None = None
    """System message put before string prompts when the chat template is applied."""
    max_prompt_length: int | None = 4096
    """Longest prompt in tokens; None for no limit."""
    overlong_prompts: str = "drop"
    """What to do with a prompt over max_prompt_length: 'drop' (logged and counted) or 'error'."""
    shuffle: bool = True
    """Reshuffle the training prompts every epoch."""
    seed: int = 1234
    """Seed of the per-epoch shuffle."""

    def __post_init__(self) -> None:
        for name in ("train_path", "val_path"):
            path = getattr(self, name)
            if path is not None and not str(path).endswith(_EXTENSIONS):
                raise ConfigError(f"data.{name} must end with one of {_EXTENSIONS}, got {path!r}")
        for name in ("prompt_key", "answer_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
                raise ConfigError(f"data.{name} must be a field name (dots for nested fields), got {value!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"data.max_prompt_length must be >= 1 or null, got {self.max_prompt_length}")
        if self.overlong_prompts not in _OVERLONG:
            raise ConfigError(f"data.overlong_prompts must be one of {_OVERLONG}, got {self.overlong_prompts!r}")


class DataError(ValueError):
    """A data set row cannot be used; the message names the file, the line or row, and the field."""


class PromptDataset:
    """Tokenised prompts; item i is {prompt_ids, prompt_text, answer, index} (index = source row, 0-based)."""

    def __init__(self, items: list[dict[str, Any]], path: str, num_dropped: int = 0):
        self.items = items
        self.path = path
        self.num_dropped = num_dropped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def __iter__(self):
        return iter(self.items)


def _read_rows(path: str) -> list[tuple[str, Any]]:
    """[(location, row)], location like 'line 3' (JSONL, 1-based) or 'row 2' (Parquet, 0-based)."""
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"line {lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        return rows
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return [(f"row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unsupported file type; use one of {_EXTENSIONS}")


def get_field(row: Any, key: str) -> Any:
    """`row[key]`, or for a dotted key the nested field; KeyError names the missing part."""
    if isinstance(row, dict) and key in row:
        return row[key]
    node = row
    for depth, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(key.split(".")[:depth]) or "the row"
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"missing field {key!r} ({part!r} not in {where}; found {have})")
        node = node[part]
    return node


def _check_prompt(prompt: Any, where: str, key: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        for j, message in enumerate(prompt):
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise DataError(f"{where}: field {key!r} message {j} must be a dict with string 'role' and "
                                f"'content', got {message!r}")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: field {key!r} must be a string or a non-empty list of chat messages, "
                    f"got {type(prompt).__name__}: {prompt!r:.80}")


def _check_answer(answer: Any, where: str, key: str) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    raise DataError(f"{where}: field {key!r} must be a string or a number, got {type(answer).__name__}: "
                    f"{answer!r:.80}")


def render_prompt(prompt: str | list[dict[str, str]], config: DataConfig, tokenizer: Any) -> tuple[str, bool]:
    """(prompt text, whether the text already carries the tokenizer's special tokens)."""
    if not config.apply_chat_template:
        if not isinstance(prompt, str):
            raise ConfigError("data.apply_chat_template is false but a prompt is a chat message list; "
                              "set data.apply_chat_template: true or store prompts as strings")
        return prompt, False
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(prompt, str) and config.system_prompt:
        messages = [{"role": "system", "content": config.system_prompt}] + messages
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, True


def load_prompt_dataset(path: str, config: DataConfig, tokenizer: Any) -> PromptDataset:
    """Read, check and tokenise every row of `path`."""
    path = os.fspath(path)
    if not path.endswith(_EXTENSIONS):
        raise DataError(f"{path}: unsupported file type; use one of {_EXTENSIONS}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt data set {path!r} does not exist")
    if config.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.apply_chat_template is true but the tokenizer has no chat template; "
                          f"set data.apply_chat_template: false to use the prompts as plain text ({path})")
    items: list[dict[str, Any]] = []
    dropped = 0
    for index, (loc, row) in enumerate(_read_rows(path)):
        where = f"{path}: {loc}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        try:
            prompt = get_field(row, config.prompt_key)
            answer = get_field(row, config.answer_key)
        except KeyError as exc:
            raise DataError(f"{where}: {exc.args[0]}") from None
        prompt = _check_prompt(prompt, where, config.prompt_key)
        answer = _check_answer(answer, where, config.answer_key)
        text, templated = render_prompt(prompt, config, tokenizer)
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if config.max_prompt_length is not None and len(ids) > config.max_prompt_length:
            if config.overlong_prompts == "error":
                raise DataError(f"{where}: field {config.prompt_key!r} is {len(ids)} tokens, over "
                                f"data.max_prompt_length={config.max_prompt_length}")
            dropped += 1
            continue
        if not ids:
            raise DataError(f"{where}: field {config.prompt_key!r} tokenises to no tokens")
        items.append({"prompt_ids": list(ids), "prompt_text": text, "answer": answer, "index": index})
    if dropped:
        logger.warning("%s: dropped %d of %d prompts longer than data.max_prompt_length=%d tokens",
                       path, dropped, dropped + len(items), config.max_prompt_length)
    if not items:
        raise DataError(f"{path}: no usable prompts ({dropped} dropped as longer than "
                        f"data.max_prompt_length={config.max_prompt_length})")
    return PromptDataset(items, path, num_dropped=dropped)


class PromptIterator:
    """Endless batches of prompts, epoch after epoch, with an exactly restorable position."""

    def __init__(self, dataset: PromptDataset, shuffle: bool = True, seed: int = 1234):
        if len(dataset) == 0:
            raise ValueError("PromptIterator needs a non-empty data set")
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    @classmethod
    def from_config(cls, dataset: PromptDataset, config: DataConfig) -> PromptIterator:
        """The iterator a run uses: data.shuffle with data.seed."""
        return cls(dataset, shuffle=config.shuffle, seed=config.seed)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # Seeded per (seed, epoch) rather than from a running RNG, so a position is enough to resume.
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n_prompts: int) -> list[dict[str, Any]]:
        """The next `n_prompts` items; a batch that reaches the end of an epoch continues into the next."""
        if n_prompts < 1:
            raise ValueError(f"next_batch: n_prompts must be >= 1, got {n_prompts}")
        batch = []
        while len(batch) < n_prompts:
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n_prompts - len(batch), len(self._order) - self.offset)
            batch.extend(self.dataset[i] for i in self._order[self.offset:self.offset + take])
            self.offset += take
        return batch

    def state_dict(self) -> dict[str, int | bool]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "shuffle": self.shuffle,
                "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        missing = {"epoch", "offset", "seed", "shuffle", "dataset_size"} - set(state)
        if missing:
            raise ValueError(f"PromptIterator state is missing {sorted(missing)}")
        if state["dataset_size"] != len(self.dataset):
            raise ValueError(f"PromptIterator state was saved for a data set of {state['dataset_size']} prompts, "
                             f"this one has {len(self.dataset)} ({self.dataset.path}); resuming would not "
                             f"reproduce the data order")
        if not 0 <= int(state["offset"]) <= len(self.dataset) or int(state["epoch"]) < 0:
            raise ValueError(f"PromptIterator state has an impossible position: epoch {state['epoch']}, "
                             f"offset {state['offset']} of {len(self.dataset)}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._epoch_order(self.epoch)
