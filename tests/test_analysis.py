"""Which partitions matter: ranking and subsets, MoP over a subset, partition topics, tables."""

import math
import re

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file
from scipy import sparse

from mop.cli import main
from mop.config import check_analysis, validate_config
from mop.errors import MopError
from mop.finetune import FinetuneConfig, build_classifier
from mop.io import read_json, write_json, write_parquet
from mop.plan import Run
from mop.report import load_runs
from mop.report.figures import figure_topics
from mop.report.tables import table_single_adapters, table_subsets
from mop.subsets import adapter_paths, rank_partitions, select, select_subsets
from mop.tasks import get_task
from mop.topics import group_partitions, partition_documents, run_topics, tfidf, top_terms
from tests.conftest import REPO, snakemake

# dev / test per partition and seed: dev ranks 1 = 3 > 0 > 2 > 4 (1 and 3 tie), test is
# the reverse, so a ranking that used test would come out differently.
SCORES = {
    0: [(0.60, 0.60), (0.62, 0.60)],
    1: [(0.70, 0.50), (0.70, 0.52)],
    2: [(0.55, 0.66), (0.57, 0.66)],
    3: [(0.70, 0.55), (0.70, 0.55)],
    4: [(0.50, 0.70), (0.52, 0.72)],
}


def _run(root, kind, dev, test, train=0.9, **fields):
    """A finished run's metrics in its folder of the results layout (its identity)."""
    where = {} if kind == "base" else {"kg": "g", "k": 5, "scheme": "metis"}
    out = root / Run(kind, task="probe", model="m", **where, **fields).folder("results")
    write_json(
        {
            "main_metric": "accuracy",
            "train_accuracy": train,
            "dev_accuracy": dev,
            "test_accuracy": test,
        },
        out / "metrics.json",
    )
    return out / "metrics.json"


@pytest.fixture
def single_files(tmp_path):
    return [
        _run(tmp_path, "single", dev, test, part=p, seed=s)
        for p, runs in SCORES.items()
        for s, (dev, test) in enumerate(runs)
    ]


def test_ranking_by_dev_breaks_ties_by_partition(single_files):
    ranking = rank_partitions(load_runs(single_files), 5, "dev")
    assert ranking["partition"].to_list() == [1, 3, 0, 2, 4]
    assert ranking["mean"].to_list() == pytest.approx([0.70, 0.70, 0.61, 0.56, 0.51])
    assert ranking["std"][2] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert ranking["n"].to_list() == [2] * 5
    by_test = rank_partitions(load_runs(single_files), 5, "test")
    assert by_test["partition"].to_list() == [4, 2, 0, 3, 1]


def test_top_bottom_and_list_subsets(single_files):
    runs = load_runs(single_files)
    rules = {
        "top2": {"top": 2},
        "top1": {"top": 1},
        "bottom2": {"bottom": 2},
        "all": {"top": 5},
        "mine": {"partitions": [4, 0]},
    }
    record = select_subsets(runs, rules, 5, "dev")
    parts = {name: s["partitions"] for name, s in record["subsets"].items()}
    # the tie 1 = 3 falls to the lower id for top 1
    assert parts == {
        "top2": [1, 3],
        "top1": [1],
        "bottom2": [2, 4],
        "all": [0, 1, 2, 3, 4],
        "mine": [0, 4],
    }
    assert record["subsets"]["top2"]["rule"] == "top 2"
    assert record["subsets"]["mine"]["rule"] == "list"
    assert (record["task"], record["model"], record["kg"], record["k"]) == ("probe", "m", "g", 5)
    assert [r["partition"] for r in record["ranking"]] == [1, 3, 0, 2, 4]


def test_full_tie_keeps_top_and_bottom_apart(tmp_path):
    files = [_run(tmp_path, "single", 0.5, 0.5, part=p, seed=0) for p in (3, 1, 0, 2)]
    ranking = rank_partitions(load_runs(files), 4)
    assert ranking["partition"].to_list() == [0, 1, 2, 3]
    assert select(ranking, {"top": 2}, 4) == [0, 1]
    assert select(ranking, {"bottom": 2}, 4) == [2, 3]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"top": 6}, "analysis.subsets.x.top: 6 is not between 1 and K = 5"),
        ({"bottom": 0}, "analysis.subsets.x.bottom: 0 is not between 1 and K = 5"),
        ({"partitions": [0, 5]}, r"analysis.subsets.x.partitions: \[0, 5\] must be distinct"),
        ({"partitions": [1, 1]}, "must be distinct ids in 0..4"),
        ({"top": 1, "bottom": 1}, "give exactly one of top, bottom, partitions"),
    ],
)
def test_bad_subset_rules(single_files, rule, message):
    ranking = rank_partitions(load_runs(single_files), 5)
    with pytest.raises(MopError, match=message):
        select(ranking, rule, 5, "x")


def test_ranking_needs_every_partition(single_files):
    runs = load_runs([f for f in single_files if "/p2/" not in str(f)])
    with pytest.raises(MopError, match=r"no single-adapter run for partition\(s\) \[2\]"):
        rank_partitions(runs, 5)
    with pytest.raises(MopError, match="top / bottom need the single-adapter runs"):
        select_subsets(load_runs([]), {"t": {"top": 1}}, 5)
    listed = select_subsets(load_runs([]), {"l": {"partitions": [2]}}, 5)
    assert listed["subsets"]["l"]["partitions"] == [2] and listed["ranking"] == []


def test_select_subsets_command_writes_the_selection(single_files, tmp_path):
    out = tmp_path / Run("selection", task="probe", model="m", kg="g", k=5, scheme="metis").file(
        "subsets.json"
    )
    args = ["select-subsets", "--runs", *map(str, single_files), "--out", str(out)]
    assert main([*args, "--subsets", '{"top2": {"top": 2}, "bottom2": {"bottom": 2}}']) == 0
    sel = read_json(out)
    assert sel["subsets"]["top2"]["partitions"] == [1, 3]
    assert sel["subsets"]["bottom2"]["partitions"] == [2, 4]
    # a bad rule: one clear error, no file
    bad = out.with_name("bad.json")
    args[-1] = str(bad)
    assert main([*args, "--subsets", '{"t": {"top": 9}}']) == 1
    assert not bad.exists()


def test_mop_over_a_subset_loads_exactly_those_adapters(tiny_spec, tiny_adapters):
    selection = {"subsets": {"s": {"partitions": [0, 2]}}}
    dirs = adapter_paths(selection, "s", tiny_adapters)
    assert dirs == [tiny_adapters[0], tiny_adapters[2]]
    model, fusion = build_classifier(
        tiny_spec, get_task("probe"), "mop", dirs, FinetuneConfig(seed=0)
    )
    assert fusion == "p0,p1"
    assert set(model.encoder.adapters_config.adapters) == {"p0", "p1"}
    state = model.encoder.state_dict()
    for position, d in enumerate(dirs):
        for key, tensor in load_file(d / "adapter.safetensors").items():
            loaded = state[key.replace(".adapters.knowledge.", f".adapters.p{position}.")]
            torch.testing.assert_close(loaded, tensor, rtol=0, atol=0)
    # the adapter left out is not what sits in the second slot
    left_out = load_file(tiny_adapters[1] / "adapter.safetensors")
    key = next(iter(left_out))
    assert not torch.equal(state[key.replace(".knowledge.", ".p1.")], left_out[key])
    with pytest.raises(MopError, match="no subset 'x'"):
        adapter_paths(selection, "x", tiny_adapters)


# ----------------------------------------------------------------------------- topics


def _topic_fixture(root, names_by_partition):
    """A hand-written KG (entities only) and its membership table."""
    rows, members = [], []
    for part, names in enumerate(names_by_partition):
        for local, name in enumerate(names):
            rows.append({"id": len(rows), "key": f"E{len(rows)}", "name": name})
            members.append({"entity": len(members), "partition": part, "local": local})
    ints = {"id": pl.Int32}
    write_parquet(pl.DataFrame(rows).cast(ints), root / "kg" / "entities.parquet")
    write_parquet(pl.DataFrame(members).cast(pl.Int32), root / "part" / "membership.parquet")
    return root / "kg", root / "part"


def test_tfidf_terms_of_a_fixture_partition(tmp_path):
    kg, part = _topic_fixture(
        tmp_path, [["Kidney cyst", "Kidney stone"], ["Heart murmur", "Failure of the kidney 2"]]
    )
    docs = partition_documents(kg, part)
    assert docs["document"].to_list() == [
        "Kidney cyst\nKidney stone",
        "Heart murmur\nFailure of the kidney 2",
    ]
    assert docs["entities"].to_list() == [2, 2]
    matrix, vocab = tfidf(docs["document"].to_list())
    # stop words (of, the) and digits are not terms
    assert sorted(vocab) == ["cyst", "failure", "heart", "kidney", "murmur", "stone"]
    terms = top_terms(matrix, vocab, 10)
    # partition 0 by hand: tf kidney 2, cyst 1, stone 1; idf = ln((1 + 2) / (1 + df)) + 1:
    # kidney (in both) 1, cyst / stone ln(1.5) + 1; then scaled to unit length.
    rare = math.log(1.5) + 1
    norm = math.sqrt(2**2 + 2 * rare**2)
    p0 = terms.filter(pl.col("partition") == 0)
    assert p0["term"].to_list() == ["kidney", "cyst", "stone"]  # ties by term
    assert p0["score"].to_list() == pytest.approx([2 / norm, rare / norm, rare / norm])
    assert p0["score"][0] == pytest.approx(0.709297, abs=1e-6)
    p1 = terms.filter(pl.col("partition") == 1)
    norm1 = math.sqrt(1 + 3 * rare**2)
    assert p1["term"].to_list() == ["failure", "heart", "murmur", "kidney"]
    assert p1["score"].to_list() == pytest.approx([rare / norm1] * 3 + [1 / norm1])
    assert top_terms(matrix, vocab, 1)["term"].to_list() == ["kidney", "failure"]


def test_kmeans_groups_are_deterministic_and_numbered_by_partition():
    docs = [
        "heart murmur\nheart failure",
        "kidney cyst\nkidney stone",
        "heart valve\nheart block",
        "kidney failure\nrenal cyst",
    ]
    matrix, _ = tfidf(docs)
    groups = group_partitions(matrix, 2, seed=0)
    assert groups.tolist() == [0, 1, 0, 1]
    for seed in (0, 1, 7):
        assert group_partitions(matrix, 2, seed=seed).tolist() == [0, 1, 0, 1]
    # at most K groups, each partition its own; one group holds all
    assert group_partitions(matrix, 6, seed=0).tolist() == [0, 1, 2, 3]
    assert group_partitions(matrix, 1, seed=0).tolist() == [0, 0, 0, 0]
    rng = np.random.default_rng(0)
    noisy = sparse.csr_matrix(rng.random((12, 30)))
    a, b = group_partitions(noisy, 4, seed=3), group_partitions(noisy, 4, seed=3)
    assert a.tolist() == b.tolist() and a[0] == 0 and set(a.tolist()) == {0, 1, 2, 3}


def test_topics_files_and_figures_from_fixture_data(tmp_path):
    names = [
        ["Kidney cyst", "Kidney stone", "Renal failure"],
        ["Heart murmur", "Heart block", "Cardiac arrest"],
        ["Kidney agenesis", "Renal cyst", "Kidney dysplasia"],
        ["Seizure", "Muscle weakness", "Focal seizure"],
    ]
    kg, part = _topic_fixture(tmp_path, names)
    info = run_topics(kg, part, tmp_path / "topics", groups=3, terms=3, seed=0)
    assert info == {"partitions": 4, "groups": 3, "vocabulary": 16}
    terms = pl.read_csv(tmp_path / "topics" / "terms.csv")
    assert terms.columns == ["partition", "term", "score"]
    assert terms.group_by("partition").len().sort("partition")["len"].to_list() == [3, 3, 3, 3]
    assert terms.filter(pl.col("partition") == 3)["term"][0] == "seizure"
    groups = pl.read_csv(tmp_path / "topics" / "groups.csv")
    assert groups.columns == ["partition", "group", "entities"]
    # the two kidney partitions share a group
    assert groups["group"].to_list() == [0, 1, 0, 2]
    assert groups["entities"].to_list() == [3, 3, 3, 3]
    assert not (tmp_path / "topics" / "wordclouds.png").exists()  # the report draws them
    clouds = figure_topics(
        tmp_path / "topics" / "terms.csv",
        tmp_path / "topics" / "groups.csv",
        tmp_path / "topics" / "wordclouds",
    )
    png = clouds[0].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert clouds[1].read_bytes().startswith(b"%PDF")
    mix = tmp_path / "mixture.parquet"
    w = np.random.default_rng(0).dirichlet(np.ones(4), size=8).astype(np.float32)
    pl.DataFrame(
        {
            "id": [str(i) for i in range(8)],
            "weights": w.tolist(),
            "text": [f"Is phenotype {i} a feature of disease {i}?" for i in range(8)],
        }
    ).write_parquet(mix)
    out = figure_topics(
        tmp_path / "topics" / "terms.csv",
        tmp_path / "topics" / "groups.csv",
        tmp_path / "fig" / "figure4_topics",
        mix,
    )
    assert out[0].read_bytes().startswith(b"\x89PNG") and out[0].stat().st_size > 20_000
    three = tmp_path / "three.parquet"
    pl.DataFrame({"id": ["0"], "weights": [[0.2, 0.3, 0.5]], "text": ["q"]}).write_parquet(three)
    with pytest.raises(MopError, match="3 mixture weights per question, but"):
        figure_topics(
            tmp_path / "topics" / "terms.csv",
            tmp_path / "topics" / "groups.csv",
            tmp_path / "fig" / "bad",
            three,
        )
    assert not (tmp_path / "fig" / "bad.png").exists()


# ----------------------------------------------------------------------------- tables


def test_single_adapter_and_subset_tables(single_files, tmp_path):
    base = [
        _run(tmp_path, "base", d, t, seed=s)
        for s, (d, t) in enumerate([(0.48, 0.50), (0.56, 0.52)])
    ]
    runs = load_runs(single_files + base)
    single = table_single_adapters(runs)
    # sorted by mean test: 4 (71), 2 (66), 0 (60), 3 (55), 1 (51), under the base row
    assert [r[2] for r in single.rows] == ["base model", "4", "2", "0", "3", "1"]
    md = single.markdown()
    # p4 test 70, 72 -> 71.00 ± 1.41 vs base 50, 52: above; Welch t = 20 / sqrt(2 / 2 + 2 / 2)
    # = 14.14 with df = 2, p = 0.00496 -> dagger;
    # dev 50, 52 -> 51.00 ± 1.41 vs base 48, 56 (52.00 ± 5.66): below, no marks
    assert "| probe | m / g / 5 | base model | 52.00 ± 5.66 | 51.00 ± 1.41 |" in md
    assert "| probe | m / g / 5 | 4 | 51.00 ± 1.41 | 71.00† ± 1.41 ↑ |" in md
    assert single.rows[1][4].p_value == pytest.approx(0.0049628, rel=1e-4)
    # p1 dev 70, 70 vs 48, 56: above but p = 0.139 (no dagger); test 50, 52 = the base's
    assert "| probe | m / g / 5 | 1 | 70.00 ± 0.00 ↑ | 51.00 ± 1.41 |" in md
    selection = tmp_path / "subsets.json"
    write_json(
        select_subsets(load_runs(single_files), {"top2": {"top": 2}, "bottom2": {"bottom": 2}}, 5),
        selection,
    )
    mop = {"mixture": "softmax"}
    subset_runs = (
        [
            _run(tmp_path, "subset", 0.8, t, train=0.95, subset="top2", seed=s, **mop)
            for s, t in enumerate([0.64, 0.66])
        ]
        + [
            _run(tmp_path, "subset", 0.6, t, subset="bottom2", seed=s, **mop)
            for s, t in enumerate([0.54, 0.56])
        ]
        + [_run(tmp_path, "mop", 0.8, 0.7, seed=s, **mop) for s in range(2)]
    )
    table = table_subsets(load_runs(single_files + base + subset_runs), [selection])
    labels = [r[1] for r in table.rows]
    assert labels == [
        "1",
        "3",
        "0",
        "2",
        "4",
        "MoP over top2 (top 2: 1, 3)",
        "MoP over bottom2 (bottom 2: 2, 4)",
        "MoP over all 5",
        "base model",
    ]
    assert [r[2] for r in table.rows[:5]] == ["top2", "top2", "-", "bottom2", "bottom2"]
    md = table.markdown()
    assert "| m / g / 5 | MoP over top2 (top 2: 1, 3) | top2 | 95.00 ± 0.00 | 80.00 ± 0.00 |" in md
    assert "65.00† ± 1.41 ↑ |" in md  # top2 test: 64, 66 vs base 50, 52
    assert "| m / g / 5 | MoP over all 5 | - | 90.00 ± 0.00 | 80.00 ± 0.00 | 70.00" in md
    assert "ranked by its mean dev metric" in table.caption
    paths = table.write(tmp_path / "tables", "subsets_probe")
    csv = pl.read_csv(paths[1])
    assert csv["test_mean"].to_list()[5:8] == pytest.approx([65.0, 55.0, 70.0])


# ----------------------------------------------------------------------------- workflow


ANALYSIS = """
analysis:
  single_adapters: true
  subsets:
    best: {top: 1}
    worst: {bottom: 1}
    both: {partitions: [0, 1]}
  topics: {}
"""


def _workdir(tmp_path, extra):
    (tmp_path / "config").mkdir(parents=True)
    text = (REPO / ".test" / "config" / "config.yaml").read_text()
    text = text[: text.index("\n# Which partitions matter")] + "\n"
    (tmp_path / "config" / "config.yaml").write_text(text + extra)
    return tmp_path


def _job_counts(stdout: str) -> dict[str, int]:
    table = stdout[stdout.index("Job stats:") :].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_expands_the_analysis_jobs(tmp_path):
    work = _workdir(tmp_path, ANALYSIS)
    result = snakemake(work, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = _job_counts(result.stdout)
    # K = 2 partitions x 2 seeds alone; one selection; 3 subsets x 2 seeds
    assert counts["finetune_adapter"] == 4
    assert counts["select_subsets"] == 1
    assert counts["finetune_subset"] == 6
    assert counts["topics"] == 1
    for rule in ("report_single_adapters", "report_subsets", "report_figure_topics"):
        assert counts[rule] == 1
    assert "results/topics/hpo-tiny/k2-metis/wordclouds.png" in result.stdout
    assert "results/tables/subsets_probe.md" in result.stdout
    assert "adapter/hpo-tiny/k2-metis/p1/seed1/metrics.json" in result.stdout
    assert "mop-softmax/hpo-tiny/k2-metis/subset-worst/seed1/metrics.json" in result.stdout
    assert not (work / "results").exists()


def _config(analysis: dict) -> dict:
    config = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    return validate_config({**config, "analysis": analysis})


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        (
            {"subsets": {"best": {"top": 1}}},
            "config key analysis.subsets.best.top: ranking the adapters needs the "
            "single-adapter runs",
        ),
        (
            {"single_adapters": True, "subsets": {"best": {"top": 3}}},
            "config key analysis.subsets.best.top: 3 adapters of finetune.k = 2",
        ),
        (
            {"subsets": {"mine": {"partitions": [0, 2]}}},
            "config key analysis.subsets.mine.partitions: 2 is not a partition",
        ),
        ({"tasks": ["hoc"]}, "config key analysis.tasks: hoc is not in"),
        (
            {"single_adapters": True, "rank_by": "train", "eval_train": False},
            "config key analysis.rank_by: train ranks by the training split's metric, but "
            "finetune.eval_train is false for probe",
        ),
    ],
)
def test_bad_analysis_configs(analysis, message):
    analysis = dict(analysis)
    eval_train = analysis.pop("eval_train", True)
    config = _config(analysis)
    config["finetune"]["eval_train"] = eval_train
    with pytest.raises(MopError, match=re.escape(message)):
        check_analysis(config)


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        ({"subsets": {"bad": {}}}, "config key analysis.subsets.bad"),
        ({"subsets": {"bad": {"top": 1, "bottom": 1}}}, "config key analysis.subsets.bad"),
        ({"subsets": {"a/b": {"top": 1}}}, "config key analysis.subsets"),
        ({"rank_by": "best"}, "config key analysis.rank_by"),
        ({"topics": {"groups": 0}}, "config key analysis.topics.groups"),
    ],
)
def test_analysis_schema(analysis, message):
    with pytest.raises(MopError, match=re.escape(message)):
        _config(analysis)


def test_analysis_defaults():
    an = _config({"topics": {}})["analysis"]
    assert an["topics"] == {"groups": 6, "terms": 20, "seed": 0}
    assert (an["single_adapters"], an["rank_by"], an["subsets"]) == (False, "dev", {})
    assert "topics" not in _config({})["analysis"]


def test_a_bad_analysis_stops_the_workflow_before_any_job(tmp_path):
    work = _workdir(tmp_path, "analysis:\n  subsets:\n    best: {top: 1}\n")
    result = snakemake(work, "-n")
    assert result.returncode != 0
    assert "config key analysis.subsets.best.top: ranking" in result.stderr + result.stdout
    assert not (work / "results").exists()


def test_every_analysis_key_is_documented():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    doc = (REPO / "config" / "README.md").read_text()
    section = doc[doc.index("## `analysis`") : doc.index("## `resources.<stage>`")]
    analysis = schema["properties"]["analysis"]["properties"]
    for key in [*analysis, *analysis["topics"]["properties"], "top", "bottom", "partitions"]:
        assert f"`{key}" in section, key
