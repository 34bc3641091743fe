import os
import signal
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from mop.batching import Sequences, bucketed_batches
from mop.errors import MopError
from mop.models import load_tokenizer
from mop.pretrain import (
    EntityPredictor,
    PretrainConfig,
    build_adapter_model,
    filtered_ranks,
    knowledge_probe,
    load_entity_predictor,
    load_partition_data,
    pretrain_partition,
    probe_rows,
)
from tests.conftest import checkpoint_step, kill_at_checkpoint


def test_tokens_read_cls_head_sep_relation_sep(small_kg, small_tokens, tiny_spec):
    tok = load_tokenizer(tiny_spec)
    tokens = pl.read_parquet(small_tokens)
    ents = pl.read_parquet(small_kg / "entities.parquet")
    rels = pl.read_parquet(small_kg / "relations.parquet")
    row = tokens.row(0, named=True)
    head = ents.filter(pl.col("id") == row["head"])["name"][0]
    rel = rels.filter(pl.col("id") == row["relation"])["name"][0]
    assert row["target"] == row["tail"] and row["direction"] == 0
    assert row["input_ids"] == tok(head, rel, truncation=True, max_length=64)["input_ids"]
    assert tokens["input_ids"].list.len().max() <= 64


def test_partition_examples_have_local_labels(small_kg, small_partition, small_tokens):
    members = pl.read_parquet(small_partition / "membership.parquet")
    for part in range(3):
        data = load_partition_data(small_tokens, small_partition, small_kg, part)
        size = members.filter(pl.col("partition") == part).height
        assert data.num_entities == size
        assert data.labels.min() >= 0 and data.labels.max() < size
        stats = pl.read_parquet(small_partition / "triples.parquet").filter(
            pl.col("partition") == part
        )
        assert len(data.seqs) == stats.height


def test_buckets_cover_every_example_once_and_are_seeded():
    lengths = np.random.default_rng(0).integers(3, 40, size=1000)
    a = bucketed_batches(lengths, 32, seed=1, epoch=0)
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    assert all(x.size <= 32 for x in a)
    b = bucketed_batches(lengths, 32, seed=1, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = bucketed_batches(lengths, 32, seed=1, epoch=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # Buckets keep lengths within a batch close: far less padding than random batches.
    pad = sum(lengths[x].max() * x.size - lengths[x].sum() for x in a)
    assert pad < 0.2 * lengths.sum()


def test_padding_never_reaches_the_prediction(small_kg, small_partition, small_tokens, tiny_spec):
    """An example scores the same alone and padded inside a batch of longer ones."""
    torch.manual_seed(0)
    data = load_partition_data(small_tokens, small_partition, small_kg, 0)
    model = EntityPredictor(build_adapter_model(tiny_spec, "k", 8), data.num_entities).eval()
    lengths = data.seqs.lengths
    short, long = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[short] < lengths[long]
    ids, mask = data.seqs.pad(np.array([short, long]))
    assert mask[0].sum() == lengths[short] and (ids[0][mask[0] == 0] == 0).all()
    alone_ids, alone_mask = data.seqs.pad(np.array([short]))
    with torch.no_grad():
        batched = model(ids, mask)[0]
        alone = model(alone_ids, alone_mask)[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_filtered_ranks_match_brute_force():
    rng = np.random.default_rng(0)
    # scores on a coarse grid, so that many non-answers tie with their row's target
    scores = torch.from_numpy(rng.integers(0, 6, size=(20, 30)).astype(np.float32))
    targets = torch.from_numpy(rng.integers(0, 30, size=20))
    known = torch.from_numpy(rng.random((20, 30)) < 0.1)
    known[torch.arange(20), targets] = True
    ranks = filtered_ranks(scores, targets, known)
    ties_seen = 0
    for i in range(20):
        t = int(targets[i])
        others = [e for e in range(30) if not known[i, e]]
        higher = sum(1 for e in others if scores[i, e] > scores[i, t])
        ties = sum(1 for e in others if scores[i, e] == scores[i, t])
        ties_seen += ties
        assert ranks[i] == pytest.approx(1 + higher + ties / 2)
    assert ties_seen > 20


def test_ties_never_count_for_the_target():
    """A head that scores every entity the same knows nothing: its realistic rank is the
    middle of the list (hits@1 0), not 1 (hits@1 1, what `scores > target` gave)."""
    scores = torch.zeros(3, 10)
    targets = torch.tensor([0, 4, 9])
    known = torch.zeros(3, 10, dtype=torch.bool)
    known[torch.arange(3), targets] = True
    known[2, 3] = True  # another answer of the third query: filtered out
    ranks = filtered_ranks(scores, targets, known)
    assert ranks.tolist() == [5.5, 5.5, 5.0]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_probe_scores_are_fp32_under_bf16(
    device, small_kg, small_partition, small_tokens, tiny_spec
):
    """Two entities whose head rows differ by 0.1% tie in bf16 logits; the probe scores in
    fp32, so under a bf16 runtime (CPU autocast, or CUDA) the better non-answer still ranks
    above the target."""
    from mop.runtime import Runtime, resolve_device

    data = load_partition_data(small_tokens, small_partition, small_kg, 0)
    torch.manual_seed(0)
    model = EntityPredictor(build_adapter_model(tiny_spec, "knowledge", 8), data.num_entities)
    rows = np.array([0])
    target = int(data.labels[0])
    other = next(
        e for e in range(data.num_entities) if e not in data.labels[data.query == data.query[0]]
    )
    with torch.no_grad():
        vector = model.cls(*data.seqs.pad(rows))[0]
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[target] = vector / vector.norm() * 50
        model.head.weight[other] = model.head.weight[target] * 1.001
    bf16 = Runtime(resolve_device(device), "bf16")
    model.to(bf16.device)
    ids, mask = (bf16.to_device(t) for t in data.seqs.pad(rows))
    with torch.no_grad(), bf16.forward_context():
        logits = model(ids, mask).float().cpu()
    assert logits[0, target] == logits[0, other]  # bf16 logits tie: the trap
    probe = knowledge_probe(model, data, rows, 0, runtime=bf16)
    assert probe["hits_at_1"] == 0.0 and probe["mrr"] == pytest.approx(0.5)


def test_the_original_entity_head_reads_the_pooler_with_dropout(
    small_kg, small_partition, small_tokens, tiny_spec, tmp_path
):
    """pooling pooler + dropout 0.1 (config/paper.yaml): the head is trained on BERT's
    pooler output and a reloaded predictor pools the same way."""
    data = load_partition_data(small_tokens, small_partition, small_kg, 1)
    cfg = PretrainConfig(epochs=1, lr=1e-3, batch_size=16, pooling="pooler", dropout=0.1)
    pretrain_partition(tiny_spec, data, cfg, tmp_path)
    model = load_entity_predictor(tiny_spec, tmp_path / "adapter", tmp_path / "head.safetensors")
    assert model.pooling == "pooler"
    ids, mask = data.seqs.pad(np.arange(4))
    with torch.no_grad():
        out = model.encoder(input_ids=ids, attention_mask=mask)
        expected = model.head(out.pooler_output)
        torch.testing.assert_close(model(ids, mask), expected)
        assert not torch.allclose(model.head(out.last_hidden_state[:, 0]), expected)
    with pytest.raises(MopError, match="head_init: names"):
        pretrain_partition(
            tiny_spec, data, PretrainConfig(pooling="pooler", head_init="names"), tmp_path / "x"
        )


def test_training_moves_the_head_and_adapter_and_saves_reloadable_files(
    small_kg, small_partition, small_tokens, tiny_spec, tmp_path
):
    data = load_partition_data(small_tokens, small_partition, small_kg, 1)
    cfg = PretrainConfig(epochs=2, lr=1e-3, batch_size=16, seed=4)
    torch.manual_seed(cfg.seed)
    initial = EntityPredictor(build_adapter_model(tiny_spec, "knowledge", 8), data.num_entities)
    metrics = pretrain_partition(tiny_spec, data, cfg, tmp_path)
    head = load_file(tmp_path / "head.safetensors")
    assert not torch.allclose(head["weight"], initial.head.weight)
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert not (tmp_path / "checkpoint").exists()
    assert metrics["loss_curve"][-1]["loss"] < metrics["loss_curve"][0]["loss"]
    probe = metrics["probe"]["train"]
    assert 0 <= probe["hits_at_1"] <= probe["hits_at_10"] <= 1
    assert probe["examples"] == len(data.seqs)
    # Reloaded in a fresh process: the same logits on the same inputs.
    code = (
        "import sys, torch, numpy as np\n"
        "from mop.models import resolve_model\n"
        "from mop.pretrain import load_entity_predictor, load_partition_data\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import MODELS\n"
        f"data = load_partition_data(r'{small_tokens}', r'{small_partition}', r'{small_kg}', 1)\n"
        "m = load_entity_predictor(resolve_model('tiny', MODELS), "
        f"r'{tmp_path / 'adapter'}', r'{tmp_path / 'head.safetensors'}')\n"
        "ids, mask = data.seqs.pad(np.arange(8))\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids, mask), r'{tmp_path / 'fresh.pt'}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())
    here = load_entity_predictor(tiny_spec, tmp_path / "adapter", tmp_path / "head.safetensors")
    ids, mask = data.seqs.pad(np.arange(8))
    with torch.no_grad():
        logits = here(ids, mask)
    torch.testing.assert_close(torch.load(tmp_path / "fresh.pt", weights_only=True), logits)
    again = knowledge_probe(here, data, np.arange(len(data.seqs)), 0)
    assert again["hits_at_10"] == pytest.approx(probe["hits_at_10"], abs=1e-6)


def _pretrain_cmd(small_kg, small_partition, small_tokens, out, models):
    import json

    options = {"epochs": 3, "lr": 1e-3, "batch_size": 4, "seed": 2, "checkpoint_every": 10}
    return [
        sys.executable,
        "-m",
        "mop.cli",
        "pretrain",
        "--kg",
        str(small_kg),
        "--tokens",
        str(small_tokens),
        "--partition",
        str(small_partition),
        "--models",
        json.dumps(models),
        "--options",
        json.dumps(options),
        "--out",
        str(out),
    ]


def test_resume_after_sigkill_gives_the_uninterrupted_adapter(
    small_kg, small_partition, small_tokens, models, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = "results/adapters/g/k3-metis/tiny/p2"  # the folder names the partition
    full, killed = tmp_path / "full" / run, tmp_path / "killed" / run
    subprocess.run(
        _pretrain_cmd(small_kg, small_partition, small_tokens, full, models),
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        _pretrain_cmd(small_kg, small_partition, small_tokens, killed, models),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_at_checkpoint(proc, killed / "checkpoint", signal.SIGKILL)
    step = checkpoint_step(killed / "checkpoint")
    assert not (killed / "adapter").exists()
    result = subprocess.run(
        _pretrain_cmd(small_kg, small_partition, small_tokens, killed, models),
        check=True,
        capture_output=True,
        text=True,
    )
    assert f"resuming from step {step}" in result.stdout + result.stderr
    a = load_file(full / "adapter" / "adapter.safetensors")
    b = load_file(killed / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.testing.assert_close(
        load_file(full / "head.safetensors")["weight"],
        load_file(killed / "head.safetensors")["weight"],
        rtol=0,
        atol=0,
    )


def test_sequences_from_series_round_trip():
    s = pl.Series([[1, 2, 3], [4], [5, 6]], dtype=pl.List(pl.Int32))
    seqs = Sequences.from_series(s)
    ids, mask = seqs.pad(np.array([1, 0]))
    assert ids.tolist() == [[4, 0, 0], [1, 2, 3]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1]]


def test_bidirectional_examples_predict_the_head(small_kg, tiny_spec, tmp_path):
    from mop.pretrain import tokenize_kg

    n = tokenize_kg(small_kg, tiny_spec, tmp_path / "t.parquet", bidirectional=True)
    tokens = pl.read_parquet(tmp_path / "t.parquet")
    triples = pl.read_parquet(small_kg / "triples.parquet")
    assert n == 2 * triples.height
    back = tokens.filter(pl.col("direction") == 1).row(0, named=True)
    assert back["target"] == back["head"]
    ents = pl.read_parquet(small_kg / "entities.parquet")
    rels = pl.read_parquet(small_kg / "relations.parquet")
    tail = ents.filter(pl.col("id") == back["tail"])["name"][0]
    rel = rels.filter(pl.col("id") == back["relation"])["name"][0]
    tok = load_tokenizer(tiny_spec)
    assert back["input_ids"] == tok(rel, tail, truncation=True, max_length=64)["input_ids"]


def test_tokens_written_in_chunks_equal_one_pass(small_kg, tiny_spec, tmp_path):
    """Memory stays bounded on all-UMLS graphs: the examples go out a chunk of triples at a
    time, as row groups, in the order and with the content of one sorted pass."""
    import pyarrow.parquet as pq

    from mop.pretrain import tokenize_kg

    whole, chunked = tmp_path / "whole.parquet", tmp_path / "chunked.parquet"
    n = tokenize_kg(small_kg, tiny_spec, whole, bidirectional=True)
    assert tokenize_kg(small_kg, tiny_spec, chunked, bidirectional=True, chunk_triples=7) == n
    triples = pl.read_parquet(small_kg / "triples.parquet")
    assert pq.ParquetFile(chunked).num_row_groups == 2 * -(-triples.height // 7)
    a, b = pl.read_parquet(whole), pl.read_parquet(chunked)
    assert a.equals(b)
    keys = ["direction", "head", "relation", "tail"]
    assert b.select(keys).equals(b.select(keys).sort(keys))


def test_heldout_share_is_probed_separately(
    small_kg, small_partition, small_tokens, tiny_spec, tmp_path
):
    data = load_partition_data(
        small_tokens, small_partition, small_kg, 0, heldout_share=0.2, seed=1
    )
    assert 0.1 < data.heldout.mean() < 0.3
    m = pretrain_partition(
        tiny_spec, data, PretrainConfig(epochs=1, lr=1e-3, heldout_share=0.2), tmp_path
    )
    assert m["probe"]["heldout"]["examples"] == int(data.heldout.sum())
    assert m["train_examples"] == int((~data.heldout).sum())
    card = __import__("json").loads((tmp_path / "card.json").read_text())
    assert len(card["data_hash"]) == 16 and card["entities"] == data.num_entities


@pytest.mark.slow
def test_compiled_training_runs_on_the_cpu(
    small_kg, small_partition, small_tokens, tiny_spec, tmp_path
):
    """`runtime.compile`: the training forward through torch.compile (inductor on the CPU;
    a minute or more to compile). Its dropout draws from another generator, so the check
    is that gradients flow through the compiled forward and the adapter trains, not that
    it matches the eager run bit for bit."""
    from mop.runtime import Runtime, seed_all

    data = load_partition_data(small_tokens, small_partition, small_kg, 0)
    cfg = PretrainConfig(epochs=1, lr=1e-3, batch_size=32, max_steps=4, log_every=1)
    m = pretrain_partition(
        tiny_spec, data, cfg, tmp_path, runtime=Runtime.create("cpu", "fp32", 2, compile=True)
    )
    assert m["runtime"]["compile"] is True and m["steps"] == 4
    assert all(np.isfinite([p["loss"] for p in m["loss_curve"]]))
    seed_all(cfg.seed)
    start = build_adapter_model(tiny_spec, "knowledge", 8).state_dict()
    trained = load_file(tmp_path / "adapter" / "adapter.safetensors")
    moved = [k for k, v in trained.items() if not torch.equal(v, start[k])]
    assert moved and len(moved) == len(trained)


def test_a_held_out_fact_keeps_its_reverse_out_of_training(
    small_kg, small_partition, tiny_spec, tmp_path
):
    """With bidirectional examples, holding out (h, r, t) holds out (r, t) -> h too."""
    from mop.pretrain import tokenize_kg

    tokens = tmp_path / "both.parquet"
    tokenize_kg(small_kg, tiny_spec, tokens, bidirectional=True)
    data = load_partition_data(tokens, small_partition, small_kg, 1, heldout_share=0.3, seed=2)
    n = len(data.seqs) // 2  # rows: every fact forwards, then the same facts backwards
    assert len(data.seqs) == 2 * n and 0.2 < data.heldout.mean() < 0.4
    np.testing.assert_array_equal(data.heldout[:n], data.heldout[n:])
    table = pl.read_parquet(tokens)
    assert (table["direction"] == 1).sum() == (table["direction"] == 0).sum()


def test_heldout_facts_leave_with_their_inverse(tmp_path, tiny_spec):
    """SFull keeps both directions of every MRDOC inverse pair: holding out (h, r, t) but
    training on (t, inverse(r), h) would make held-out hits@k an inverse lookup."""
    import polars as pl

    from mop.kg import read_kg, write_kg
    from mop.kg.synthetic import write_umls_release
    from mop.kg.umls import load_umls
    from mop.partition import run_partition
    from mop.pretrain import load_partition_data, tokenize_kg

    write_umls_release(tmp_path / "umls", concepts=300, mrrel_rows=3000, seed=0)
    kg, meta = load_umls(tmp_path / "umls")
    write_kg(kg, tmp_path / "kg", meta)
    rel = read_kg(tmp_path / "kg").relations
    pairs = rel.filter(pl.col("inverse").is_not_null())
    assert pairs.height >= 10  # SFull keeps both directions of the pairs
    back = dict(zip(pairs["id"], pairs["inverse"], strict=True))
    assert all(back[back[r]] == r for r in back)  # the pairs point at each other
    run_partition(tmp_path / "kg", tmp_path / "part", 1, seed=0)
    tokenize_kg(tmp_path / "kg", tiny_spec, tmp_path / "tokens.parquet")
    data = load_partition_data(
        tmp_path / "tokens.parquet",
        tmp_path / "part",
        tmp_path / "kg",
        0,
        heldout_share=0.3,
        seed=1,
    )
    rows = (
        pl.read_parquet(tmp_path / "tokens.parquet")
        .sort(["direction", "head", "relation", "tail"])
        .select("head", "relation", "tail")
        .with_columns(heldout=pl.Series(data.heldout))
    )
    training = {(h, r, t) for h, r, t, held in rows.iter_rows() if not held}
    held = [(h, r, t) for h, r, t, x in rows.iter_rows() if x]
    assert 0.2 < len(held) / rows.height < 0.4
    with_inverse = [(h, r, t) for h, r, t in held if r in back]
    assert len(with_inverse) > 20
    assert not [f for f in with_inverse if (f[2], back[f[1]], f[0]) in training]


def test_declared_inverses_and_a_bad_name(tmp_path):
    import pytest

    from mop.errors import MopError
    from mop.kg.sources import build_kg

    path = tmp_path / "t.tsv"
    path.write_text("head\trelation\ttail\na\thas part\tb\nb\tpart of\ta\nb\tnext to\tc\n")
    kg, _ = build_kg(
        {
            "source": "triples",
            "path": str(path),
            "inverses": {"has part": "part of", "next to": "next to"},
        },
        "kgs.t",
    )
    inv = dict(zip(kg.relations["name"], kg.relations["inverse"], strict=True))
    ids = dict(zip(kg.relations["name"], kg.relations["id"], strict=True))
    assert inv == {
        "has part": ids["part of"],
        "next to": ids["next to"],
        "part of": ids["has part"],
    }
    with pytest.raises(MopError, match=r"kgs.t.inverses: 'contains' is not a relation"):
        build_kg(
            {"source": "triples", "path": str(path), "inverses": {"has part": "contains"}}, "kgs.t"
        )


def test_the_probe_ranks_a_seeded_sample(
    small_kg, small_partition, small_tokens, tiny_spec, tmp_path
):
    rows = np.arange(100, 400)
    sample = probe_rows(rows, 50, seed=3)
    assert sample.size == 50 and np.unique(sample).size == 50 and set(sample) <= set(rows)
    assert (np.diff(sample) > 0).all()  # row order kept
    np.testing.assert_array_equal(sample, probe_rows(rows, 50, seed=3))
    assert not np.array_equal(sample, probe_rows(rows, 50, seed=4))
    np.testing.assert_array_equal(probe_rows(rows, "all", 3), rows)
    np.testing.assert_array_equal(probe_rows(rows, 1000, 3), rows)  # fewer than asked: all

    data = load_partition_data(small_tokens, small_partition, small_kg, 0)
    cfg = PretrainConfig(epochs=1, lr=1e-3, batch_size=16, probe_examples=20)
    m = pretrain_partition(tiny_spec, data, cfg, tmp_path)
    assert m["probe"]["train"]["examples"] == 20 < m["train_examples"]
    assert m["probe_seconds"] > 0
    assert PretrainConfig.from_options({"probe_examples": "all"}).probe_examples == "all"
