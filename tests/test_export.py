"""Export a fine-tuned run, load it in a fresh process, predict the same."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from transformers import AutoModel

import mop
from mop.cli import main
from mop.errors import MopError
from mop.export import export_run
from mop.finetune import FinetuneConfig, finetune
from mop.fusion import MixtureConfig
from mop.tasks import get_task
from mop.tasks.probe import prepare

TASK = get_task("probe")


@pytest.fixture(scope="module")
def pair_probe(small_kg, small_partition, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair-probe")
    prepare(
        small_kg,
        small_partition,
        out,
        max_questions={"train": 64, "dev": 24, "test": 24},
        format="pair",
    )
    return out


def _run(kind, tiny_spec, tiny_adapters, task_dir, out, head="bilinear", save=True, **mixture):
    """A short run of the base model (kind "base") or of MoP with that mixture kind; a
    routed mixture gets `links` among the mixture's settings."""
    method = "base" if kind == "base" else "mop"
    links = mixture.pop("links", None)
    cfg = FinetuneConfig(
        epochs=1,
        batch_size=16,
        lr=5e-4,
        seed=0,
        eval_train=False,
        head=head,
        save_model=save,
        mixture=MixtureConfig() if kind == "base" else MixtureConfig(kind=kind, **mixture),
    )
    adapters = tiny_adapters if method == "mop" else []
    finetune(tiny_spec, TASK, task_dir, method, adapters, cfg, out, links=links)
    return out


def _test_probs(run_dir):
    frame = pl.read_parquet(run_dir / "predictions.parquet").filter(pl.col("split") == "test")
    return frame["id"].to_list(), np.array(frame["prob"].to_list())


@pytest.mark.parametrize("kind", ["base", "softmax", "gumbel", "moe"])
def test_an_export_predicts_what_the_run_predicted_in_a_fresh_process(
    kind, tiny_spec, tiny_adapters, pair_probe, tmp_path
):
    run = _run(kind, tiny_spec, tiny_adapters, pair_probe, tmp_path / "run")
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    meta = json.loads((export / "mop.json").read_text())
    assert meta["method"] == ("base" if kind == "base" else "mop")
    assert meta["adapters"] == ([] if kind == "base" else ["p0", "p1", "p2"])
    if kind != "base":
        assert json.loads((export / "fusion" / "mixture.json").read_text())["kind"] == kind
        assert (export / "fusion" / "adapter_fusion_config.json").is_file()
        assert (export / "adapters" / "p1" / "adapter_config.json").is_file()
    assert (export / "fusion" / "mixture_extra.safetensors").is_file() == (kind == "moe")
    # the base encoder alone is a plain transformers model: nothing missing or unexpected
    _, info = AutoModel.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    card = (export / "README.md").read_text()
    assert "accuracy: dev" in card and "library_name: adapters" in card

    test = pl.read_parquet(pair_probe / "test.parquet")
    inputs = tmp_path / "questions.jsonl"
    with inputs.open("w") as f:
        for row in test.select("id", "text_a", "text_b", "candidate").iter_rows(named=True):
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "predictions.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mop.cli",
            "predict",
            str(export),
            "--input",
            str(inputs),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids, expected = _test_probs(run)
    assert [r["id"] for r in rows] == ids
    got = np.array([[r["probs"]["no"], r["probs"]["yes"]] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [r["label"] for r in rows] == [TASK.labels[i] for i in expected.argmax(1)]


def test_mop_load_in_python_with_a_linear_head(tiny_spec, tiny_adapters, pair_probe, tmp_path):
    run = _run("softmax", tiny_spec, tiny_adapters, pair_probe, tmp_path / "run", head="linear")
    export_run(run, tmp_path / "export")
    model = mop.load(tmp_path / "export", device="cpu")
    test = pl.read_parquet(pair_probe / "test.parquet")
    probs = model.predict_records(test.select("text_a", "text_b").to_dicts())
    np.testing.assert_allclose(probs, _test_probs(run)[1], atol=1e-6)


def test_a_loaded_model_computes_in_its_runs_precision(
    tiny_spec, tiny_adapters, pair_probe, tmp_path, monkeypatch
):
    """`auto` differs between machines (bf16 on CPUs with AMX or AVX-512 BF16), so an
    export records the precision its run computed in and loads in it unless asked."""
    from mop import runtime

    run = _run("base", tiny_spec, tiny_adapters, pair_probe, tmp_path / "run")
    ran = json.loads((run / "metrics.json").read_text())["runtime"]["precision"]
    export_run(run, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "mop.json").read_text())["precision"] == ran
    # a machine where `auto` picks the other precision
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set() if ran == "bf16" else {"amx_bf16"})
    other = "fp32" if ran == "bf16" else "bf16"
    assert mop.load(tmp_path / "export").runtime.precision == ran
    assert mop.load(tmp_path / "export", precision="auto").runtime.precision == other


def test_bad_inputs_stop_with_the_file_and_line(
    tiny_spec, tiny_adapters, pair_probe, tmp_path, capsys
):
    run = _run("base", tiny_spec, tiny_adapters, pair_probe, tmp_path / "run")
    export = tmp_path / "export"
    export_run(run, export)
    cases = {
        "empty.jsonl": ("", "no inputs (empty file)"),
        "missing.jsonl": (
            '{"text_a": "Marfan syndrome", "candidate": "Tall stature"}\n{"text_a": "x"}\n',
            "missing.jsonl:2: missing 'candidate'",
        ),
        "choice.jsonl": (
            '{"text_a": "a", "candidate": "b", "choices": ["x", "y"]}\n',
            "not a multiple-choice one",
        ),
        "broken.jsonl": (
            '{"text_a": "a", "candidate": "b"}\n{oops\n',
            "broken.jsonl:2: not valid JSON",
        ),
        "table.csv": ("text_a,candidate\na,b\n", "input must be .jsonl or .tsv"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["predict", str(export), "--input", str(path), "--out", str(out)]) == 1
        assert message in capsys.readouterr().err, name
        assert not out.exists()
    tsv = tmp_path / "ok.tsv"
    tsv.write_text("text_a\tcandidate\nMarfan syndrome\tTall stature\n")
    assert (
        main(["predict", str(export), "--input", str(tsv), "--out", str(tmp_path / "ok.jsonl")])
        == 0
    )
    row = json.loads((tmp_path / "ok.jsonl").read_text())
    assert row["id"] == "2" and set(row["probs"]) == {"no", "yes"}


@pytest.mark.parametrize("router", ["names", "bm25"])
def test_a_prior_mixture_exports_its_linker(
    router, tiny_spec, tiny_adapters, small_kg, small_partition, pair_probe, tmp_path, monkeypatch
):
    """A -prior mixture's export routes new inputs itself, as the run's links did: with
    the entity linker, or with the BM25 partition router."""
    import os

    from mop.linking import run_link

    # as the workflow links: paths relative to its working directory
    links = tmp_path / "results" / "links" / "probe" / "g" / "k3-metis"
    monkeypatch.chdir(tmp_path)
    kg, part = (os.path.relpath(p, tmp_path) for p in (small_kg, small_partition))
    run_link(pair_probe, kg, part, links, min_chars=3)
    assert json.loads((links / "coverage.json").read_text())["kg"] == kg  # relative
    monkeypatch.chdir(tmp_path.parent)  # the export runs from anywhere
    run = _run(
        "softmax",
        tiny_spec,
        tiny_adapters,
        pair_probe,
        tmp_path / "run",
        prior=True,
        route_prior=5.0,
        router=router,
        links=links / "links.parquet",
    )
    export = tmp_path / "export"
    meta = export_run(run, export)
    expected = {"router": router, "min_chars": 3, "k": 3}
    assert meta["linker"] == expected | ({"bm25_temperature": 1.0} if router == "bm25" else {})
    table = pl.read_parquet(export / "linker" / "entities.parquet")
    names = pl.read_parquet(small_kg / "entities.parquet").height
    if router == "bm25" and (small_kg / "synonyms.parquet").is_file():
        names += pl.read_parquet(small_kg / "synonyms.parquet").height  # synonyms too
    assert table.height == names
    model = mop.load(export)
    test = pl.read_parquet(pair_probe / "test.parquet")
    records = test.select("text_a", "text_b", "candidate").to_dicts()
    np.testing.assert_allclose(model.predict_records(records), _test_probs(run)[1], atol=1e-6)
    # the links matter: the same inputs with their routes switched off score differently
    model.meta["linker"] = None
    assert not np.allclose(model.predict_records(records), _test_probs(run)[1], atol=1e-4)
    # a run whose links were removed cannot be exported
    (links / "coverage.json").unlink()
    with pytest.raises(MopError, match=r"coverage\.json"):
        export_run(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_what_cannot_be_exported_says_why(tiny_spec, tiny_adapters, pair_probe, tmp_path):
    run = _run("base", tiny_spec, tiny_adapters, pair_probe, tmp_path / "nosave", save=False)
    with pytest.raises(MopError, match="save_model: false"):
        export_run(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(MopError, match="not a mop export"):
        mop.load(tmp_path)
