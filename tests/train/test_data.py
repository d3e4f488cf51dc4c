"""The example-data catalog and the file loaders."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lorastack.train import data
from lorastack.train.data import DataError, carve_validation, load_records, load_splits


@pytest.fixture(scope="module")
def reviews():
    data.pull_dataset("drug-reviews")
    return {s: load_records("drug-reviews", s) for s in ("train", "test")}


def test_official_splits_and_label_counts(reviews):
    assert len(reviews["train"]) == 600 and len(reviews["test"]) == 379
    assert Counter(r["label"] for r in reviews["train"]) == {
        "positive": 385, "negative": 161, "neutral": 54}
    assert Counter(r["label"] for r in reviews["test"]) == {
        "positive": 248, "negative": 95, "neutral": 36}
    assert set(reviews["train"][0]) >= {"id", "text", "label", "drug", "condition"}


def test_text_is_cleaned(reviews):
    texts = [r["text"] for r in reviews["train"] + reviews["test"]]
    assert not any("&#039;" in t or "&quot;" in t or "&amp;" in t for t in texts)
    assert not any(t.startswith('"') or "  " in t for t in texts)  # wrapping quotes gone
    assert any("didn't" in t for t in texts)  # &#039; became an apostrophe
    conditions = {r["condition"] for r in reviews["train"] + reviews["test"]}
    assert "Bipolar Disorder" in conditions and "Fibromyalgia" in conditions
    assert not any(c and ("</span>" in c or c.endswith("Disorde")) for c in conditions)


def test_test_split_is_held_out(reviews):
    train_ids = {r["id"] for r in reviews["train"]}
    assert not train_ids & {r["id"] for r in reviews["test"]}


def test_validation_is_carved_from_train_with_a_fixed_seed(reviews):
    splits = load_splits("drug-reviews", validation_fraction=0.15, seed=0)
    assert {k: len(getattr(splits, k)) for k in ("train", "validation", "test")} == {"train": 510, "validation": 90, "test": 379}
    again = load_splits("drug-reviews", validation_fraction=0.15, seed=0)
    assert [r["id"] for r in again.validation] == [r["id"] for r in splits.validation]
    other = load_splits("drug-reviews", validation_fraction=0.15, seed=1)
    assert [r["id"] for r in other.validation] != [r["id"] for r in splits.validation]
    ids = [r["id"] for r in splits.train + splits.validation]
    assert sorted(ids) == sorted(r["id"] for r in reviews["train"])  # disjoint and complete
    # stratified: every class is in validation, roughly in proportion
    assert Counter(r["label"] for r in splits.validation) == {
        "positive": 58, "negative": 24, "neutral": 8}


def test_a_run_carves_validation_with_split_seed_not_training_seed(reviews):
    from lorastack.train.config import build_config
    from lorastack.train.run import config_splits

    def val_ids(**over):
        raw = {"task": {"type": "classification", "labels": ["positive", "negative", "neutral"]},
               "data": {"source": "drug-reviews", **over.pop("data", {})},
               "training": over}
        return [r["id"] for r in config_splits(build_config(raw)).validation]

    default = val_ids()
    assert default == [r["id"] for r in load_splits(
        "drug-reviews", validation_fraction=0.15, seed=0, stratify="label").validation]
    assert val_ids(seed=7) == default  # other training seeds, same validation set
    assert val_ids(data={"split_seed": 7}) != default


def test_carve_keeps_a_training_row_per_class():
    rows = [{"label": "a"}] * 10 + [{"label": "rare"}]
    train, val = carve_validation(rows, 0.5, seed=0)
    assert {"label": "rare"} in train and len(val) == 5


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_file_format_is_the_same_path(tmp_path, suffix):
    rows = [{"body": "great, works", "stars": "positive"}, {"body": "awful", "stars": "negative"}]
    path = tmp_path / f"reviews{suffix}"
    if suffix in (".csv", ".tsv"):
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["body", "stars"], delimiter="\t" if suffix == ".tsv"
                                    else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    records = load_records(path, columns={"text": "body", "label": "stars"})
    assert [(r["text"], r["label"]) for r in records] == [
        ("great, works", "positive"), ("awful", "negative")]


def test_ragged_csv_row_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,positive\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"bad.csv line 3: 3 fields, the header has 2"):
        load_records(path)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        load_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(DataError, match="line 1: a JSON list, expected an object"):
        load_records(path)


def test_missing_mapped_column_lists_the_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,stars\nnice,5\n")
    with pytest.raises(DataError) as err:
        load_records(path, columns={"text": "body"})
    assert "text <- 'body'" in str(err.value) and "review, stars" in str(err.value)


@pytest.mark.parametrize("name,content,match", [
    ("empty.csv", "", "no records"),
    ("header_only.tsv", "text\tlabel\n", "no records"),
    ("data.xlsx", "x", "unsupported file type .xlsx"),
    ("dupes.csv", "a,a\n1,2\n", "duplicate column"),
    ("broken.parquet", "not parquet", "not a readable Parquet file"),
])
def test_malformed_files_get_clear_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_records(path)


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        data.pull_dataset("nope")


def test_offline_and_not_cached(isolated_home, monkeypatch):
    monkeypatch.setenv("LORASTACK_OFFLINE", "1")
    with pytest.raises(DataError, match="lorastack data pull drug-reviews"):
        load_records("drug-reviews")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(path)


# -- one split to evaluate on (lorastack eval --data ... --split ...) -------------------------

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_of_a_file_with_a_split_column(tmp_path):
    path = _jsonl(tmp_path / "all.jsonl", [{"text": str(i), "split": s} for i, s in
                                           enumerate(["train", "test", "validation", "test"])])
    records, where = data.load_split(path, "validation")
    assert [r["text"] for r in records] == ["2"] and "split=validation (1 of 4 rows)" in where
    assert [r["text"] for r in data.load_split(path)[0]] == ["1", "3"]  # default: test
    with pytest.raises(DataError, match=r"no rows with split='dev'.*'test', 'train', "
                                        r"'validation': pass --split one of them"):
        data.load_split(path, "dev")


def test_training_reads_a_split_column_as_eval_does(tmp_path):
    """A file with a split column: training takes its train rows, its validation rows (else
    carves validation from train) and its test rows, so `lorastack eval --data FILE` never
    measures on rows the adapter was trained on."""
    rows = [{"text": str(i), "label": "ab"[i % 2], "split": s} for i, s in
            enumerate(["train"] * 8 + ["validation", "validation", "test", "test", "test"])]
    path = _jsonl(tmp_path / "all.jsonl", rows)
    splits = load_splits(path)
    assert [r["text"] for r in splits.train] == [str(i) for i in range(8)]
    assert [r["text"] for r in splits.validation] == ["8", "9"]
    assert [r["text"] for r in splits.test] == ["10", "11", "12"]
    no_val = load_splits(_jsonl(tmp_path / "nv.jsonl", [r for r in rows
                                                        if r["split"] != "validation"]),
                         validation_fraction=0.25)
    assert len(no_val.train) == 6 and len(no_val.validation) == 2  # carved from train
    assert {r["text"] for r in no_val.test} == {"10", "11", "12"}
    with pytest.raises(DataError, match=r"'split' column .* it has 'dev', 'train': mark rows "
                                        r"train, validation or test"):
        load_splits(_jsonl(tmp_path / "dev.jsonl", [dict(rows[0]), dict(rows[1], split="dev")]))


def test_a_file_without_splits_is_used_whole_and_refuses_a_split(tmp_path):
    path = _jsonl(tmp_path / "plain.jsonl", [{"text": "a"}, {"text": "b"}])
    records, where = data.load_split(path)
    assert len(records) == 2 and where.endswith("(all 2 rows)")
    with pytest.raises(DataError, match=r"has no splits \(no 'split' column\), so --split "
                                        r"validation cannot apply: drop --split"):
        data.load_split(path, "validation")


def test_split_of_a_directory_of_split_files(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "t"}])
    (tmp_path / "test.csv").write_text("text\nx\ny\n")
    assert [r["text"] for r in data.load_split(tmp_path)[0]] == ["x", "y"]
    assert [r["text"] for r in data.load_split(tmp_path, "train")[0]] == ["t"]
    with pytest.raises(DataError, match="has no validation split: give --split one of test, "
                                        "train"):
        data.load_split(tmp_path, "validation")
