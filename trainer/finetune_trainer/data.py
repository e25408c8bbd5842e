"""The training data: read a jsonl, csv or parquet file, tokenize, split, and batch it.

A record is either one text (`dataset.textField`, default 'text'), trained on every token, or a
prompt and a completion (`promptField`/`completionField`), concatenated as given, with the loss on
the completion only (prompt labels are -100). An end-of-sequence token closes every record, then
the sequence is truncated to `dataset.maxSequenceLength` tokens. A record left with no token to
learn (a prompt longer than the limit) is dropped with a warning.

Every problem with the file is one line naming the file, the line or row, and the rule.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.resource import DatasetFormat, DatasetSource
from finetune_trainer.errors import InvalidInputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLIT_SEED = 42


@dataclass(frozen=True)
class Fields:
    """The columns a record needs: one text column, or prompt and completion columns."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @classmethod
    def from_source(cls, source: DatasetSource) -> Fields:
        return cls(source.resolved_text_field, source.prompt_field, source.completion_field)

    @property
    def names(self) -> list[str]:
        return [name for name in (self.text, self.prompt, self.completion) if name is not None]

    def describe(self, name: str) -> str:
        """Which spec field names the column, for error messages."""
        if name == self.text:
            return "the text field, spec.dataset.textField"
        if name == self.prompt:
            return "spec.dataset.promptField"
        return "spec.dataset.completionField"


Record = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One tokenized record."""

    input_ids: list[int]
    labels: list[int]


def read_records(path: str, fmt: DatasetFormat, fields: Fields) -> list[Record]:
    """Read the needed columns of every record, as strings."""
    file = Path(path)
    if not file.exists():
        raise InvalidInputError(f"dataset {path}: no such file")
    if not file.is_file():
        raise InvalidInputError(f"dataset {path}: not a regular file (expected a {fmt.value} file)")
    if file.stat().st_size == 0:
        raise InvalidInputError(f"dataset {path}: the file is empty")
    readers: dict[DatasetFormat, Callable[[Path, Fields], list[Record]]] = {
        DatasetFormat.JSONL: _read_jsonl,
        DatasetFormat.CSV: _read_csv,
        DatasetFormat.PARQUET: _read_parquet,
    }
    records = readers[fmt](file, fields)
    if not records:
        raise InvalidInputError(f"dataset {path}: no records")
    return records


def _read_jsonl(file: Path, fields: Fields) -> list[Record]:
    records = []
    try:
        with file.open(encoding="utf-8") as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidInputError(
                        f"dataset {file}: line {number} is not valid JSON ({exc.msg})"
                    ) from None
                if not isinstance(value, dict):
                    raise InvalidInputError(f"dataset {file}: line {number} is not a JSON object")
                records.append(_pick(value, fields, file, f"line {number}"))
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"dataset {file}: not UTF-8 text ({exc.reason})") from None
    return records


def _read_csv(file: Path, fields: Fields) -> list[Record]:
    records = []
    try:
        with file.open(encoding="utf-8", newline="") as stream:
            reader = csv.DictReader(stream)
            columns = reader.fieldnames or []
            _require_columns(columns, fields, file)
            for row in reader:
                records.append(_pick(row, fields, file, f"line {reader.line_num}"))
    except csv.Error as exc:
        raise InvalidInputError(f"dataset {file}: not valid CSV ({exc})") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"dataset {file}: not UTF-8 text ({exc.reason})") from None
    return records


def _read_parquet(file: Path, fields: Fields) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
        _require_columns(list(schema.names), fields, file)
        for name in fields.names:
            kind = schema.field(name).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise InvalidInputError(
                    f"dataset {file}: column {name!r} ({fields.describe(name)}) has type {kind}, "
                    "expected strings"
                )
        rows = pq.read_table(file, columns=fields.names).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInputError(f"dataset {file}: not a valid parquet file ({exc})") from None
    return [_pick(row, fields, file, f"row {number}") for number, row in enumerate(rows, start=1)]


def _require_columns(columns: Sequence[str], fields: Fields, file: Path) -> None:
    for name in fields.names:
        if name not in columns:
            known = ", ".join(columns) or "none"
            raise InvalidInputError(
                f"dataset {file}: no column {name!r} ({fields.describe(name)}); "
                f"its columns are: {known}"
            )


def _pick(row: dict[str, Any], fields: Fields, file: Path, where: str) -> Record:
    record = {}
    for name in fields.names:
        if name not in row:
            raise InvalidInputError(
                f"dataset {file}: {where} has no field {name!r} ({fields.describe(name)})"
            )
        value = row[name]
        if value is None:
            raise InvalidInputError(f"dataset {file}: {where}: field {name!r} has no value (null)")
        if not isinstance(value, str):
            raise InvalidInputError(
                f"dataset {file}: {where}: field {name!r} must be a string, "
                f"got {type(value).__name__}"
            )
        record[name] = value
    return record


TOKENIZE_CHUNK = 1024


def _token_ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts, in chunks (a fast tokenizer batches them)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        ids.extend(tokenizer(chunk, add_special_tokens=special)["input_ids"])
    return ids


@dataclass(frozen=True)
class Tokenized:
    """The examples, and the longest record's token count before truncation ('auto' RoPE)."""

    examples: list[Example]
    longest: int


def tokenize(
    records: Sequence[Record], tokenizer: Any, fields: Fields, max_length: int
) -> list[Example]:
    """Tokenize every record (see the module docstring); drops records with nothing to learn."""
    return tokenize_records(records, tokenizer, fields, max_length).examples


def tokenize_records(
    records: Sequence[Record], tokenizer: Any, fields: Fields, max_length: int
) -> Tokenized:
    """tokenize(), with the longest record's length before truncation."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pairs: list[tuple[list[int], list[int]]] = []
    if fields.text is not None:
        for ids in _token_ids(tokenizer, [r[fields.text] for r in records], special=True):
            pairs.append((ids + eos, ids + eos))
    else:
        assert fields.prompt is not None and fields.completion is not None
        prompts = _token_ids(tokenizer, [r[fields.prompt] for r in records], special=True)
        completions = _token_ids(tokenizer, [r[fields.completion] for r in records], special=False)
        for prompt, completion in zip(prompts, completions, strict=True):
            target = completion + eos
            pairs.append((prompt + target, [IGNORE_INDEX] * len(prompt) + target))
    examples = []
    longest = max((len(full_ids) for full_ids, _ in pairs), default=0)
    for full_ids, full_labels in pairs:
        ids, labels = full_ids[:max_length], full_labels[:max_length]
        if len(ids) >= 2 and any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append(Example(ids, labels))
    dropped = len(records) - len(examples)
    if dropped:
        log.warning(
            "%d of %d records have no token to learn within %d tokens and were dropped",
            dropped,
            len(records),
            max_length,
        )
    return Tokenized(examples, longest)


def split(
    examples: Sequence[Example], validation: int, seed: int = SPLIT_SEED
) -> tuple[list[Example], list[Example]]:
    """Hold out `validation` examples, chosen by a seeded shuffle: (train, validation)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:validation])
    train = [example for index, example in enumerate(examples) if index not in held_out]
    return train, [examples[index] for index in sorted(held_out)]


class PlannedRecords:
    """The `records` training examples the run sees, in order: the training split repeated, each
    pass in its own seeded order, cut at `records`. Training reads it sequentially, so a resumed
    run continues exactly where the checkpoint left off."""

    def __init__(self, train: Sequence[Example], records: int, seed: int = SPLIT_SEED) -> None:
        if not train:
            raise ValueError("no training examples")
        self._train = list(train)
        self._records = records
        self._seed = seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self._records

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < self._records:
            raise IndexError(index)
        epoch, offset = divmod(index, len(self._train))
        example = self._train[self._order(epoch)[offset]]
        return {"input_ids": example.input_ids, "labels": example.labels}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self._train)))
            random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]


class ExampleList:
    """The validation examples as a map-style dataset."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self._examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


class Collator:
    """Right-pads a batch: input_ids with the pad token, labels with -100, attention_mask 0."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(item["input_ids"]) for item in batch)
        ids, labels, mask = [], [], []
        for item in batch:
            pad = width - len(item["input_ids"])
            ids.append(item["input_ids"] + [self.pad_token_id] * pad)
            labels.append(item["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(item["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
