"""`lorastack adapters list|show|rm|import`, driven through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorastack.adapters.cli import adapters_app, models_app
from lorastack.adapters.manifest import Metrics

pytestmark = pytest.mark.usefixtures("store_env")
runner = CliRunner()


def run(*args: str, env=None, **kwargs):
    env = {"COLUMNS": "200", **(env or {})}  # wide enough for whole table cells
    result = runner.invoke(adapters_app, list(args), env=env, **kwargs)
    result.flat = " ".join(result.output.split())  # rich wraps lines at the terminal width
    return result


def failed_cleanly(result) -> bool:
    """Exit 1 with 'error: ...', no traceback."""
    return (result.exit_code == 1 and isinstance(result.exception, SystemExit)
            and "error:" in result.output and "Traceback" not in result.output)


def test_errors_are_one_line_on_stderr():
    shown = run("show", "nope")
    pulled = runner.invoke(models_app, ["pull"], env={"LORASTACK_OFFLINE": "1"})
    for result in (shown, pulled):
        assert failed_cleanly(result) and result.stderr.startswith("error: ")
        assert not result.stdout and result.stderr.count("\n") == 1
    assert "lorastack models pull smollm2-135m" in pulled.stderr


@pytest.fixture
def base_dir(tmp_path, fake):
    """A stand-in base model directory (config.json + safetensors), resolvable offline."""
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fake.write_safetensors(path / "model.safetensors", {"w": ("F32", [2, 2])})
    return path


def test_list_shows_adapters_and_skips_broken_ones(store, add_adapter):
    add_adapter("reviews")
    add_adapter("qa", task="generation", metrics=Metrics())
    (store.root / "broken").mkdir()
    result = run("list", "--store", str(store.root))
    assert result.exit_code == 0, result.output
    assert "reviews" in result.flat and "qa" in result.flat
    assert "classification" in result.flat and "generation" in result.flat
    assert "accuracy 0.75 (test)" in result.flat
    assert "skipped broken" in result.flat and "manifest.json is missing" in result.flat


def test_list_reads_the_store_from_the_environment(store, add_adapter):
    add_adapter("from-env")
    result = run("list", env={"LORASTACK_STORE": str(store.root)})
    assert result.exit_code == 0 and "from-env" in result.flat


def test_list_of_an_empty_store(store):
    result = run("list", "--store", str(store.root))
    assert result.exit_code == 0 and "adapters" in result.flat


BOX = set("│┃┏┓┗┛┡┩└┘─━┬┴┼╇")


@pytest.mark.parametrize("columns", ["200", "40"])
def test_list_piped_is_one_aligned_line_per_adapter(store, add_adapter, columns):
    add_adapter("reviews")
    add_adapter("a-much-longer-adapter-name", task="generation", metrics=Metrics())
    result = run("list", "--store", str(store.root), env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and not BOX & set(result.stdout)  # header + one line each, no box
    header, *rows = lines
    assert header.split() == ["name", "task", "base", "rank", "size", "key", "metric",
                              "created"]
    assert rows[0].startswith("a-much-longer-adapter-name  generation ")
    assert rows[1].startswith("reviews ") and "accuracy 0.75 (test)" in rows[1]
    for column in ("task", "base", "rank", "created"):  # every column starts where its header
        start = header.index(column)
        assert all(row[start - 2:start] == "  " and row[start] != " " for row in rows), column
    assert "classification (2 labels)" in rows[1] and "smollm2-135m abababab" in rows[1]


def test_list_plain_and_table_on_a_terminal(store, add_adapter, monkeypatch):
    from rich.console import Console

    from lorastack.adapters import cli

    add_adapter("reviews")
    monkeypatch.setattr(cli, "console", Console(force_terminal=True, width=200))
    assert "┏" in run("list", "--store", str(store.root)).stdout  # wide enough: the table
    plain = run("list", "--plain", "--store", str(store.root)).stdout
    assert len(plain.splitlines()) == 2 and not BOX & set(plain)
    monkeypatch.setattr(cli, "console", Console(force_terminal=True, width=60))
    narrow = run("list", "--store", str(store.root)).stdout  # too narrow: never wrapped cells
    assert narrow.splitlines()[1].startswith("reviews ") and not BOX & set(narrow)


def test_list_json_has_the_full_fields(store, add_adapter, fake):
    add_adapter("reviews")
    add_adapter("qa", task="generation", metrics=Metrics())
    (store.root / "broken").mkdir()
    result = run("list", "--json", "--store", str(store.root))
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)  # problems go to stderr, never into the JSON
    assert [a["name"] for a in listed] == ["qa", "reviews"]
    reviews = listed[1]
    assert reviews["base_fingerprint"] == fake.FINGERPRINT
    assert reviews["labels"] == ["negative", "positive"] and reviews["task"] == "classification"
    assert reviews["key_metric"] == {"split": "test", "metric": "accuracy", "value": 0.75}
    assert reviews["metrics"]["validation"] == {"accuracy": 0.8}
    assert reviews["rank"] == 8 and reviews["target_modules"] == ["q_proj", "v_proj"]
    assert reviews["size_bytes"] > 0 and reviews["path"] == str(store.root / "reviews")
    assert listed[0]["key_metric"] is None and "skipped broken" in result.stderr
    assert json.loads(run("list", "--json", "--store", str(store.root / "none")).stdout) == []


def test_show_prints_the_manifest(store, add_adapter):
    add_adapter("reviews")
    result = run("show", "reviews", "--store", str(store.root))
    assert result.exit_code == 0, result.output
    assert '"prompt_template"' in result.output and '"negative"' in result.output
    digest = store.resolve("reviews").content_hash().split(":", 1)[1][:16]
    assert f"version reviews@{digest}" in result.output  # what the vLLM resolver accepts


def test_show_unknown_name_lists_what_there_is(store, add_adapter):
    add_adapter("one")
    result = run("show", "nope", "--store", str(store.root))
    assert failed_cleanly(result)
    assert "available: one" in result.flat


def test_show_refuses_a_broken_adapter_with_the_fix(store, add_adapter):
    add_adapter("a")
    (store.root / "a" / "adapter_model.bin").write_bytes(b"pickle")
    result = run("show", "a", "--store", str(store.root))
    assert failed_cleanly(result)
    assert "pickle" in result.flat and "Fix:" in result.flat


def test_rm_asks_unless_yes(store, add_adapter):
    add_adapter("keep")
    result = run("rm", "keep", "--store", str(store.root), input="n\n")
    assert result.exit_code == 1 and store.exists("keep")
    result = run("rm", "keep", "--store", str(store.root), input="y\n")
    assert result.exit_code == 0 and not store.exists("keep")
    add_adapter("quick")
    assert run("rm", "quick", "--yes", "--store", str(store.root)).exit_code == 0
    assert store.list() == []


def test_rm_of_a_missing_or_bad_name_fails_cleanly(store):
    assert failed_cleanly(run("rm", "ghost", "--yes", "--store", str(store.root)))
    result = run("rm", "../etc", "--yes", "--store", str(store.root))
    assert failed_cleanly(result) and "not plain" in result.flat


def test_import_a_peft_directory(store, tmp_path, fake, base_dir):
    src = fake.write_peft_dir(tmp_path / "peft-out", rank=4)
    result = run("import", str(src), "--name", "imported", "--task", "classification",
                 "--labels", "neg, pos", "--base", str(base_dir),
                 "--template", "Review: {text}\\nSentiment:", "--store", str(store.root))
    assert result.exit_code == 0, result.output
    manifest = store.resolve("imported").manifest
    assert manifest.labels == ("neg", "pos") and manifest.lora.rank == 4
    assert manifest.prompt_template == "Review: {text}\nSentiment:"
    assert manifest.base_model == str(base_dir) and manifest.base_fingerprint.startswith("sha256:")
    again = run("import", str(src), "--name", "imported", "--task", "generation",
                "--base", str(base_dir), "--store", str(store.root))
    assert failed_cleanly(again) and "already exists" in again.flat
    replaced = run("import", str(src), "--name", "imported", "--task", "generation",
                   "--base", str(base_dir), "--replace", "--store", str(store.root))
    assert replaced.exit_code == 0 and store.resolve("imported").manifest.task == "generation"


def test_import_errors_are_printed_not_raised(store, tmp_path, fake, base_dir):
    src = fake.write_peft_dir(tmp_path / "peft-out")
    one_label = run("import", str(src), "--name", "x", "--task", "classification",
                    "--labels", "only", "--base", str(base_dir), "--store", str(store.root))
    assert failed_cleanly(one_label)
    assert "got ['only']" in one_label.flat  # brackets printed as text, not rich markup
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    pickled = run("import", str(src), "--name", "x", "--task", "generation",
                  "--base", str(base_dir), "--store", str(store.root))
    assert failed_cleanly(pickled) and "never loads" in pickled.flat
    fresh = fake.write_peft_dir(tmp_path / "fresh")
    uncached = run("import", str(fresh), "--name", "x", "--task", "generation",
                   "--store", str(store.root))  # the default base is not cached in this home
    assert failed_cleanly(uncached) and "lorastack models pull smollm2-135m" in uncached.flat


def test_list_shows_ensembles_and_rm_removes_one(store, add_adapter):
    from lorastack.adapters import ensembles

    a, b = add_adapter("reviews"), add_adapter("reviews-2")
    m = a.manifest
    ensembles.write(store.root, ensembles.EnsembleManifest(
        name="pair", labels=m.labels, base_model=m.base_model,
        base_fingerprint=m.base_fingerprint, metrics=Metrics(test={"macro_f1": 0.5}),
        members=(ensembles.Member(adapter="reviews", weight=0.7, content_hash=a.content_hash()),
                 ensembles.Member(adapter="reviews-2", weight=0.3,
                                  content_hash=b.content_hash()))))
    listed = run("list", "--store", str(store.root))
    assert listed.exit_code == 0, listed.output
    assert "ensemble pair: reviews 0.70, reviews-2 0.30; macro-F1 0.500" in listed.flat
    removed = run("rm", "pair", "--yes", "--store", str(store.root))
    assert removed.exit_code == 0 and "removed pair" in removed.output, removed.output
    assert ensembles.names(store.root) == [] and store.exists("reviews")
