"""Dataset reading (jsonl, csv, parquet), its one-line errors, tokenization, split and batching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from finetune_api.resource import DatasetFormat
from finetune_trainer.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    Fields,
    PlannedRecords,
    read_records,
    split,
    tokenize,
)
from finetune_trainer.errors import InvalidInputError

TEXT = Fields(text="text")
PAIR = Fields(prompt="prompt", completion="completion")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A word-level tokenizer with <s> prepended and </s> as end of sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "b", "c", "d", "e", "f", "g", "h", "question", "answer"]
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def parquet(path: Path, columns: dict[str, list[Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_jsonl_csv_and_parquet_give_the_same_records(tmp_path: Path) -> None:
    rows = [
        {"prompt": "question a", "completion": "b c", "id": 1},
        {"prompt": "question d", "completion": "e", "id": 2},
    ]
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    csv = write(
        tmp_path / "d.csv", "prompt,completion,id\r\nquestion a,b c,1\r\nquestion d,e,2\r\n"
    )
    pq = parquet(
        tmp_path / "d.parquet",
        {"prompt": ["question a", "question d"], "completion": ["b c", "e"], "id": [1, 2]},
    )
    expected = [
        {"prompt": "question a", "completion": "b c"},
        {"prompt": "question d", "completion": "e"},
    ]
    assert read_records(jsonl, DatasetFormat.JSONL, PAIR) == expected
    assert read_records(csv, DatasetFormat.CSV, PAIR) == expected
    assert read_records(pq, DatasetFormat.PARQUET, PAIR) == expected


@pytest.mark.parametrize(
    ("name", "content", "fmt", "fields", "message"),
    [
        ("e.jsonl", "", DatasetFormat.JSONL, TEXT, "the file is empty"),
        ("blank.jsonl", "\n\n", DatasetFormat.JSONL, TEXT, "no records"),
        ("header.csv", "text\n", DatasetFormat.CSV, TEXT, "no records"),
        (
            "bad.jsonl",
            '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n',
            DatasetFormat.JSONL,
            TEXT,
            "line 3 is not valid JSON (Expecting value)",
        ),
        ("list.jsonl", '["a"]\n', DatasetFormat.JSONL, TEXT, "line 1 is not a JSON object"),
        (
            "col.jsonl",
            '{"text": "a"}\n{"body": "b"}\n',
            DatasetFormat.JSONL,
            TEXT,
            "line 2 has no field 'text' (the text field, spec.dataset.textField)",
        ),
        (
            "num.jsonl",
            '{"text": 5}\n',
            DatasetFormat.JSONL,
            TEXT,
            "line 1: field 'text' must be a string, got int",
        ),
        (
            "col.csv",
            "prompt,answer\nx,y\n",
            DatasetFormat.CSV,
            PAIR,
            "no column 'completion' (spec.dataset.completionField); its columns are: prompt, answer",
        ),
        (
            "short.csv",
            "prompt,completion\nx,y\nz\n",
            DatasetFormat.CSV,
            PAIR,
            "line 3: field 'completion' has no value (null)",
        ),
        ("notparquet.parquet", "hello", DatasetFormat.PARQUET, TEXT, "not a valid parquet file"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_file(
    tmp_path: Path, *, name: str, content: str, fmt: DatasetFormat, fields: Fields, message: str
) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(InvalidInputError) as error:
        read_records(path, fmt, fields)
    assert str(error.value).startswith(f"dataset {path}: {message}")
    assert "\n" not in str(error.value)
    assert error.value.exit_code == 2


def test_parquet_column_problems(tmp_path: Path) -> None:
    missing = parquet(tmp_path / "m.parquet", {"body": ["a"]})
    with pytest.raises(InvalidInputError, match=r"no column 'text' .*; its columns are: body$"):
        read_records(missing, DatasetFormat.PARQUET, TEXT)
    numbers = parquet(tmp_path / "n.parquet", {"text": [1, 2]})
    with pytest.raises(
        InvalidInputError, match=r"column 'text' .* has type int64, expected strings"
    ):
        read_records(numbers, DatasetFormat.PARQUET, TEXT)
    nulls = parquet(tmp_path / "z.parquet", {"text": ["a", None]})
    with pytest.raises(InvalidInputError, match=r"row 2: field 'text' has no value \(null\)$"):
        read_records(nulls, DatasetFormat.PARQUET, TEXT)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"^dataset .*/nope.jsonl: no such file$"):
        read_records(str(tmp_path / "nope.jsonl"), DatasetFormat.JSONL, TEXT)
    with pytest.raises(InvalidInputError, match=r"not a regular file"):
        read_records(str(tmp_path), DatasetFormat.JSONL, TEXT)


def test_text_records_train_on_every_token(tokenizer: Any) -> None:
    [example] = tokenize([{"text": "a b c"}], tokenizer, TEXT, max_length=16)
    assert tokenizer.convert_ids_to_tokens(example.input_ids) == ["<s>", "a", "b", "c", "</s>"]
    assert example.labels == example.input_ids


def test_prompt_tokens_are_masked(tokenizer: Any) -> None:
    [example] = tokenize(
        [{"prompt": "question a b", "completion": "c d"}], tokenizer, PAIR, max_length=16
    )
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    assert tokens == ["<s>", "question", "a", "b", "c", "d", "</s>"]
    assert example.labels[:4] == [IGNORE_INDEX] * 4
    assert example.labels[4:] == example.input_ids[4:]


def test_truncation_and_records_with_nothing_to_learn(tokenizer: Any) -> None:
    records = [
        {"prompt": "question a b c d e", "completion": "f"},  # completion cut off entirely
        {"prompt": "question", "completion": "a b c d e f g"},
    ]
    examples = tokenize(records, tokenizer, PAIR, max_length=5)
    assert len(examples) == 1
    assert len(examples[0].input_ids) == 5
    assert tokenizer.convert_ids_to_tokens(examples[0].input_ids) == [
        "<s>",
        "question",
        "a",
        "b",
        "c",
    ]


def test_split_is_seeded_and_disjoint() -> None:
    examples = [Example([i, i], [i, i]) for i in range(20)]
    train, validation = split(examples, 5)
    again_train, again_validation = split(examples, 5)
    assert (train, validation) == (again_train, again_validation)
    assert len(validation) == 5 and len(train) == 15
    assert {e.input_ids[0] for e in train}.isdisjoint({e.input_ids[0] for e in validation})
    assert split(examples, 0) == (examples, [])


def test_planned_records_wrap_around_in_a_new_order_each_pass() -> None:
    train = [Example([i], [i]) for i in range(4)]
    planned = PlannedRecords(train, records=10)
    assert len(planned) == 10
    seen = [planned[i]["input_ids"][0] for i in range(10)]
    assert sorted(seen[:4]) == [0, 1, 2, 3]  # every record once per pass
    assert sorted(seen[4:8]) == [0, 1, 2, 3]
    assert Counter(seen) == Counter({0: 2, 1: 2, 2: 2, 3: 2}) + Counter(seen[8:])
    assert seen == [planned[i]["input_ids"][0] for i in range(10)]  # deterministic
    with pytest.raises(IndexError):
        planned[10]


def test_collator_pads_right_and_masks_padding() -> None:
    batch = Collator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
