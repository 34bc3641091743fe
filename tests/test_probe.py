import polars as pl

from mop.kg import read_kg
from mop.tasks.probe import build_probe


def test_probe_splits_by_disease_with_balanced_swapped_negatives(small_kg, small_partition):
    splits = build_probe(small_kg, small_partition, seed=0)
    kg = read_kg(small_kg)
    rel = kg.relations.filter(pl.col("name") == "has phenotype")["id"][0]
    facts = set(kg.triples.filter(pl.col("relation") == rel).select("head", "tail").iter_rows())
    member = dict(
        pl.read_parquet(small_partition / "membership.parquet")
        .select("entity", "partition")
        .iter_rows()
    )
    diseases = {s: set(f["disease"]) for s, f in splits.items()}
    assert not diseases["train"] & diseases["test"]
    assert not diseases["train"] & diseases["dev"]
    assert not diseases["dev"] & diseases["test"]
    for frame in splits.values():
        assert frame["label"].mean() == 0.5
        for d, p, label, part in frame.select(
            "disease", "phenotype", "label", "partition"
        ).iter_rows():
            assert ((d, p) in facts) == bool(label)
            assert member[d] == member[p] == part  # every fact is inside one partition
        # Each disease and each phenotype is asked once "yes" and once "no" per pair, so
        # answering from the disease or the phenotype alone scores exactly 0.5.
        for col in ("disease", "phenotype"):
            rate = frame.group_by(col).agg(pl.col("label").mean().alias("r"))
            prior = frame.join(rate, on=col)
            assert prior["r"].eq(0.5).all()


def test_probe_is_seeded_and_capped(small_kg, small_partition):
    a = build_probe(small_kg, small_partition, seed=1, max_questions={"train": 40})
    b = build_probe(small_kg, small_partition, seed=1, max_questions={"train": 40})
    assert a["train"].equals(b["train"])
    assert a["train"].height == 40
    assert a["test"]["text_a"][0].startswith("Is ")


def test_pair_format_keeps_the_tail_as_candidate(small_kg, small_partition):
    q = build_probe(small_kg, small_partition, seed=0, format="question")
    p = build_probe(small_kg, small_partition, seed=0, format="pair")
    names = read_kg(small_kg).entities["name"].to_list()
    row = p["test"].row(0, named=True)
    assert row["text_a"] == names[row["disease"]] and row["text_b"] == "has phenotype"
    assert row["candidate"] == names[row["phenotype"]]
    assert q["test"]["candidate"].equals(p["test"]["candidate"])
    assert q["test"]["text_b"].is_null().all()


def test_controls_zero_shot_and_shortcut_baselines(
    small_kg, small_partition, tiny_spec, tiny_adapters, tmp_path
):
    import numpy as np

    from mop.probe_controls import best_threshold, shortcut_baselines, zero_shot
    from mop.tasks.probe import prepare

    assert best_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 1, 0, 1])) == 0.375
    task = tmp_path / "probe"
    prepare(small_kg, small_partition, task, seed=0)
    m = zero_shot(
        tiny_spec,
        task,
        small_kg,
        small_partition,
        [d.parent for d in tiny_adapters],
        tmp_path / "zs",
    )
    preds = pl.read_parquet(tmp_path / "zs" / "predictions.parquet")
    test = preds.filter(pl.col("split") == "test")
    acc = ((test["score"] > m["threshold"]).cast(pl.Int64) == test["label"]).mean()
    assert acc == m["test_accuracy"]
    assert test["score"].n_unique() > test.height // 2  # real per-question scores
    assert m["runtime"]["device"] == "cpu"  # where it ran, as every training job records
    base = shortcut_baselines(tiny_spec, task, small_kg, tmp_path / "baselines.json")
    # Swapped pairs: each test phenotype and disease is once "yes" and once "no", so the
    # priors learned on the training split cannot beat a coin on test.
    for name in (
        "majority class",
        "disease prior (train yes rate)",
        "phenotype prior (train yes rate)",
        "phenotype annotations in the KG",
    ):
        assert base[name]["test_accuracy"] == 0.5, name
    assert set(base) == {
        "majority class",
        "phenotype prior (train yes rate)",
        "disease prior (train yes rate)",
        "phenotype annotations in the KG",
        "name similarity (base encoder)",
    }


def test_every_question_is_asked_once_per_split(small_kg, small_partition):
    """Swaps of different pairs can name the same negative; the probe must not take it twice
    (ids are joined on and a repeated question would count twice)."""
    repeated = 0
    for seed in range(8):
        for frame in build_probe(small_kg, small_partition, seed=seed).values():
            repeated += frame.height - frame.select("disease", "phenotype").n_unique()
            assert frame["id"].n_unique() == frame.height
    assert repeated == 0


def test_probe_splits_go_through_the_shared_id_check(small_kg, small_partition, tmp_path):
    import json

    import pytest

    from mop.errors import MopError
    from mop.tasks import SPLITS, write_splits
    from mop.tasks.probe import SPEC, prepare

    summary = prepare(small_kg, small_partition, tmp_path, seed=0)
    written = {s: pl.read_parquet(tmp_path / f"{s}.parquet") for s in SPLITS}
    assert summary["examples"] == {s: f.height for s, f in written.items()}
    assert json.loads((tmp_path / "summary.json").read_text())["task"] == "probe"
    twice = {**written, "dev": pl.concat([written["dev"], written["dev"].head(1)])}
    with pytest.raises(MopError, match=r"probe dev: id 'dev-\d+-\d+' occurs more than once"):
        write_splits(twice, SPEC, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_rank_share_is_the_share_of_other_entities_outscored():
    import torch

    from mop.probe_controls import rank_share

    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    share = rank_share(scores, torch.tensor([2, 4]))
    # row 0: entity 2 beats 1 and 4, ties with 3 (half): 2.5 of the 4 others
    assert share.tolist() == [2.5 / 4, 0.5]
    assert rank_share(scores, torch.tensor([0, 0]))[0] == 1.0


def test_zero_shot_does_not_depend_on_each_heads_scale(
    small_kg, small_partition, tiny_spec, tiny_adapters, tmp_path
):
    """Each partition's head has its own scale and one threshold serves all of them:
    rescaling one head (weights x 40, bias + 25) must leave every score unchanged."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mop.probe_controls import zero_shot
    from mop.tasks.probe import prepare

    task = tmp_path / "probe"
    prepare(small_kg, small_partition, task, seed=0)
    runs = [d.parent for d in tiny_adapters]
    scaled = tmp_path / "scaled"
    shutil.copytree(runs[1], scaled)
    head = load_file(str(scaled / "head.safetensors"))
    save_file(
        {"weight": head["weight"] * 40, "bias": head["bias"] * 40 + 25}, scaled / "head.safetensors"
    )
    a = zero_shot(tiny_spec, task, small_kg, small_partition, runs, tmp_path / "a")
    b = zero_shot(
        tiny_spec, task, small_kg, small_partition, [runs[0], scaled, runs[2]], tmp_path / "b"
    )
    pa = pl.read_parquet(tmp_path / "a" / "predictions.parquet")
    pb = pl.read_parquet(tmp_path / "b" / "predictions.parquet")
    assert pa["score"].is_between(0, 1).all()
    assert pa["score"].equals(pb["score"]) and a == b


def test_inside_at_keeps_only_facts_inside_every_partitioning(small_kg, small_partition, tmp_path):
    from mop.partition import read_membership, run_partition

    other = tmp_path / "k5"
    run_partition(small_kg, other, 5, seed=2)
    member = read_membership(other)
    plain = build_probe(small_kg, small_partition, seed=0)
    both = build_probe(small_kg, small_partition, seed=0, inside_at=[other])
    positives = {s: f.filter(pl.col("label") == 1) for s, f in plain.items()}
    cut = sum(
        int((member[f["disease"].to_numpy()] != member[f["phenotype"].to_numpy()]).sum())
        for f in positives.values()
    )
    assert cut > 0  # without it, K = 5 cuts some of the probe's facts
    for frame in both.values():
        d, p = frame["disease"].to_numpy(), frame["phenotype"].to_numpy()
        assert (member[d] == member[p]).all()  # negatives too: every question is inside
        assert frame["label"].mean() == 0.5


def test_fair_wording_names_entities_as_text_does(small_kg, small_partition, tmp_path):
    """Synonyms and partial names break exact-name linking for part of the inputs; the
    questions themselves (ids, labels, partitions) stay those of the exact-name probe."""
    import pytest

    from mop.errors import MopError
    from mop.linking import run_link
    from mop.tasks.probe import partial_name, prepare

    kg = read_kg(small_kg)
    assert kg.synonyms is not None and kg.synonyms.height > 100  # HPO terms' synonyms
    synonyms = set(kg.synonyms["name"].to_list())
    names = kg.entities["name"].to_list()
    exact = build_probe(small_kg, small_partition, seed=0, format="pair")
    fair = build_probe(
        small_kg, small_partition, seed=0, format="pair", wording={"synonyms": 0.7, "partial": 0.7}
    )
    for split, frame in fair.items():
        assert frame.drop("text_a", "candidate").equals(exact[split].drop("text_a", "candidate"))
        own = [names[p] for p in frame["phenotype"]]
        renamed = [c for c, n in zip(frame["candidate"], own, strict=True) if c != n]
        assert renamed and all(c in synonyms for c in renamed)
        heads = list(zip(frame["text_a"], frame["disease"], strict=True))
        cut = [(t, d) for t, d in heads if t != names[d]]
        assert cut and all(t == partial_name(names[d]) for t, d in cut)
    assert partial_name("Marfan syndrome") == "Marfan" and partial_name("Fever") == "Fever"
    for name, wording in (("exact", {}), ("fair", {"synonyms": 0.7, "partial": 0.7})):
        prepare(small_kg, small_partition, tmp_path / name, seed=0, format="pair", wording=wording)
        report = run_link(
            tmp_path / name,
            small_kg,
            small_partition,
            tmp_path / f"links-{name}",
            facts=("disease", "phenotype"),
        )
        share = report["splits"]["test"]["linked_share"]
        assert share == 1.0 if name == "exact" else share < 0.9
    with pytest.raises(MopError, match=r"wording.templates: 'Is \{tail\}\?' must name"):
        build_probe(small_kg, small_partition, wording={"templates": ["Is {tail}?"]})
    paraphrased = build_probe(
        small_kg,
        small_partition,
        seed=0,
        wording={"templates": ["Does {head} show {tail}?", "{head}: is {tail} a sign?"]},
    )
    starts = {t.split()[0] for t in paraphrased["test"]["text_a"]}
    assert "Does" in starts and len(starts) > 2


def test_questions_equal_a_plain_scan_per_group(small_kg, small_partition, tmp_path, monkeypatch):
    """The grouped sort that builds a split's positives gives the questions of the obvious
    scan (every group, every fact of the split), draw for draw, with and without
    `inside_at`, so that the faster form changed no task."""
    import numpy as np

    from mop.partition import run_partition
    from mop.tasks import probe

    def scan(self, split, split_of, rng):
        rows, asked = [], set()
        heads, tails = self.heads[self.inside], self.tails[self.inside]
        for g in np.unique(self.group):
            pos = sorted(
                {
                    (int(h), int(t))
                    for h, t in zip(heads, tails, strict=True)
                    if self.group[h] == g and split_of[int(h)] == split
                }
            )
            for (d1, p1), (d2, p2) in probe._pair_up(pos, self.known, asked, rng):
                for d, ph, label in ((d1, p1, 1), (d2, p2, 1), (d1, p2, 0), (d2, p1, 0)):
                    rows.append((len(rows) // 4, int(self.part[d1]), d, ph, label))
        return pl.DataFrame(rows, schema=probe.QUESTION_SCHEMA, orient="row")

    other = tmp_path / "k5"
    run_partition(small_kg, other, 5, seed=2)
    for seed, inside_at in ((0, []), (4, [other])):
        fast = build_probe(small_kg, small_partition, seed=seed, inside_at=inside_at)
        with monkeypatch.context() as m:
            m.setattr(probe.ProbeFacts, "questions", scan)
            slow = build_probe(small_kg, small_partition, seed=seed, inside_at=inside_at)
        assert sum(f.height for f in slow.values()) > 100
        for split in slow:
            assert fast[split].equals(slow[split]), split
