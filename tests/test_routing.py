"""Entity linking, the routed mixture, its diagnostics and the MoE balance losses, each
against values worked out by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch

from mop.errors import MopError
from mop.finetune import FinetuneConfig, build_classifier, finetune, routing_diagnostics
from mop.fusion import (
    MixtureConfig,
    balance_losses,
    cv_squared,
    log_prior,
    mixture_aux_loss,
    route_loss,
    set_context,
)
from mop.linking import (
    EntityLinker,
    PartitionRetriever,
    input_text,
    link_frame,
    partition_documents,
    read_links,
    route_of,
    run_link,
)
from mop.tasks import get_task
from mop.tasks.encode import EncodedSplit
from mop.tasks.probe import prepare

TASK = get_task("probe")
PHI = {1: 0.8413447460685429, -1: 0.15865525393145707, -2: 0.022750131948179195}


@pytest.fixture(scope="module")
def probe_dir(small_kg, small_partition, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    prepare(small_kg, small_partition, out, max_questions={"train": 64, "dev": 24, "test": 24})
    return out


@pytest.fixture(scope="module")
def links(probe_dir, small_kg, small_partition, tmp_path_factory):
    out = tmp_path_factory.mktemp("links")
    summary = run_link(probe_dir, small_kg, small_partition, out, facts=("disease", "phenotype"))
    return out / "links.parquet", summary


def test_linking_is_longest_first_and_word_bounded():
    names = ["Atrial septal defect", "septal defect", "fever", "Fever", "AS", "defect"]
    linker = EntityLinker(names, min_chars=3)
    text = "ATRIAL septal defect with fever; feverish, not a Septal Defect-like thing"
    spans = linker.link(text)
    got = [(text[s.start : s.end], s.entities) for s in spans]
    assert got == [
        ("ATRIAL septal defect", (0,)),  # not "septal defect" or "defect" inside it
        ("fever", (2, 3)),  # one name, two entities; "feverish" is not a word match
        ("Septal Defect", (1,)),  # "-like" is a boundary
    ]
    # "AS" is shorter than min_chars: "was" or "as" never links
    assert linker.link("as was") == []
    # the distribution: entity 0 and 1 in partition 1, entities 2, 3 in partitions 0, 2
    partition = np.array([1, 1, 0, 2, 0, 0])
    q = route_of([s.entities for s in spans], partition, 3)
    np.testing.assert_allclose(q, [0.5 / 3, 2 / 3, 0.5 / 3], rtol=1e-6)
    assert route_of([], partition, 3).tolist() == [0.0, 0.0, 0.0]


def test_link_frame_keeps_mentions_and_marks_unlinked_inputs():
    linker = EntityLinker(["Short stature", "Seizure"])
    frame = pl.DataFrame(
        {
            "id": ["a", "b"],
            "text_a": ["Short stature and seizure", "Nothing here"],
            "text_b": [None, None],
        }
    )
    out = link_frame(frame, linker, np.array([0, 1]), 2)
    assert out["linked"].to_list() == [True, False]
    assert out["route"].to_list() == [[0.5, 0.5], [0.0, 0.0]]
    spans = out["spans"][0].to_list()
    assert [(m["field"], m["start"], m["end"], m["text"]) for m in spans] == [
        ("text_a", 0, 13, "Short stature"),
        ("text_a", 18, 25, "seizure"),
    ]


def test_choice_tasks_link_their_options_and_contexts():
    linker = EntityLinker(["Insulin", "Polyuria", "Glucagon"])
    frame = pl.DataFrame(
        {
            "id": ["q"],
            "text_a": ["Which hormone is lacking in polyuria?"],
            "text_b": [None],
            "choices": [["Glucagon", "Insulin"]],
            "contexts": [["", "Lack of insulin causes polyuria."]],
        },
        schema_overrides={"text_b": pl.String},
    )
    out = link_frame(frame, linker, np.array([0, 1, 0]), 2)
    fields = [m["field"] for m in out["spans"][0].to_list()]
    assert fields == ["text_a", "choices[0]", "choices[1]", "contexts[1]", "contexts[1]"]
    # polyuria x 2 and glucagon in partition 0, insulin x 2 in partition 1
    np.testing.assert_allclose(out["route"].to_list()[0], [0.6, 0.4], rtol=1e-6)


def test_probe_links_cover_every_question_and_name_its_partition(links):
    _, summary = links
    for split in ("train", "dev", "test"):
        c = summary["splits"][split]
        assert c["linked_share"] == 1.0 and c["entities_per_input"] >= 2
        # disease and phenotype of a probe question lie in its own partition
        assert c["top_is_true_partition"] == 1.0, split


def test_the_bm25_router_routes_by_shared_words_where_the_linker_finds_no_name():
    names = ["Atrial septal defect", "Ventricular septal defect", "Macular edema", "Myopia"]
    docs = partition_documents(names, np.array([0, 0, 1, 2]), 3)
    assert docs == ["Atrial septal defect\nVentricular septal defect", "Macular edema", "Myopia"]
    router = PartitionRetriever(docs)
    texts = ["a defect of the atrial septum", "edema of the macula, macular", "fever", ""]
    # the entity linker needs a whole name: none of these texts has one
    linker = EntityLinker(names)
    assert [linker.link(t) for t in texts] == [[], [], [], []]
    q = router.routes(texts)
    assert q[:2].argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(q[:2].sum(1), 1.0, rtol=1e-6)
    assert (q[2:] == 0).all()  # no word shared with any partition: unrouted
    # routes are softmax(scores / temperature): a lower temperature is sharper
    s = router.scores(texts[:1])[0].astype(np.float64)
    np.testing.assert_allclose(q[0], np.exp(s - s.max()) / np.exp(s - s.max()).sum(), rtol=1e-5)
    sharp = PartitionRetriever(docs, temperature=0.1).routes(texts[:1])[0]
    assert sharp.max() > q[0].max()
    with pytest.raises(MopError, match="bm25_temperature"):
        PartitionRetriever(docs, temperature=0.0)


def test_input_text_joins_every_text_field_of_an_input():
    frame = pl.DataFrame(
        {"id": ["a"], "text_a": ["Q"], "choices": [["x", "y"]], "contexts": [["", "c"]]}
    )
    assert input_text(frame) == ["Q\nx\ny\nc"]


def test_probe_links_carry_the_bm25_routes(links, probe_dir):
    path, summary = links
    table = pl.read_parquet(path)
    assert {"bm25_route", "bm25_linked"} <= set(table.columns)
    for split in ("train", "dev", "test"):
        c = summary["splits"][split]
        assert c["bm25_linked_share"] == 1.0
        # exact names on the probe: the partition holding both names scores highest
        assert c["bm25_top_is_true_partition"] >= 0.9, split
    ids = pl.read_parquet(probe_dir / "test.parquet")["id"].to_list()
    bm25 = read_links(path, ids, 3, "bm25")
    np.testing.assert_allclose(bm25.sum(1), 1.0, rtol=1e-5)
    names = read_links(path, ids, 3)
    assert not np.allclose(bm25, names)  # two routers, two columns
    with pytest.raises(MopError, match="no bm25_route column"):
        old = path.parent / "old.parquet"
        table.drop("bm25_route", "bm25_linked").write_parquet(old)
        read_links(old, ids, 3, "bm25")


def test_bm25_mixture_names():
    from mop.fusion import parse_mixture
    from mop.plan import mixture_keys, mixture_of, routed

    m = parse_mixture("softmax-routed-w6-prior-bm25")
    assert (m.routed, m.prior, m.route_loss, m.router) == (True, True, 6.0, "bm25")
    assert parse_mixture("gumbel-t0.5-prior").router == "names"
    assert routed("moe-k1-routed-bm25") and routed("softmax-prior-bm25")
    assert mixture_keys("softmax-prior-bm25") == ["fusion_reg", "route_prior"]
    with pytest.raises(MopError, match="-bm25"):
        mixture_of("softmax-bm25")  # a router with nothing to route
    # -prior-p<weight>: the run's own log-prior weight, so it does not read route_prior
    m = parse_mixture("softmax-routed-w6-prior-p4-bm25")
    assert (m.route_loss, m.route_prior, m.prior, m.router) == (6.0, 4.0, True, "bm25")
    assert parse_mixture("softmax-prior").route_prior == 1.0
    assert routed("softmax-prior-p0.5") and routed("moe-k1-prior-p10-bm25")
    assert mixture_keys("softmax-prior-p4-bm25") == ["fusion_reg"]
    assert mixture_keys("softmax-routed-prior-p4") == ["fusion_reg", "route_loss"]
    for bad in ("softmax-p4", "softmax-routed-p4", "softmax-prior-p", "softmax-prior-w4"):
        with pytest.raises(MopError, match="-prior"):
            mixture_of(bad)


def test_route_loss_is_the_cross_entropy_of_the_token_mean():
    probs = torch.tensor(
        [
            [[0.8, 0.2], [0.4, 0.6], [0.0, 1.0]],  # third token is padding
            [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],  # unlinked: no contribution
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    route = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # p = mean of the first two tokens = (0.6, 0.4); H(q, p) = -log 0.6
    assert route_loss(probs, mask, route).item() == pytest.approx(-math.log(0.6))
    half = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    expected = -(0.5 * math.log(0.6) + 0.5 * math.log(0.4))
    assert route_loss(probs, mask, half).item() == pytest.approx(expected)
    assert route_loss(probs, mask, torch.zeros(2, 2)).item() == 0.0


def test_log_prior_never_rules_a_partition_out():
    prior = log_prior(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    third = 1 / 3
    expected = [[math.log(0.5 + third)] * 2 + [math.log(third)], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(prior.numpy(), expected, rtol=1e-6)


def test_moe_balance_losses_by_hand():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    clean = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    importance, load = balance_losses(clean, clean.clone(), torch.ones(2, 3), probs, top_k=1)
    # importance sums (1, 1, 0): mean 2/3, population variance 2/9 -> CV^2 = 0.5
    assert importance.item() == pytest.approx(0.5)
    # P(in top 1): token 1 (2, 1, 0): Phi(2-1), Phi(1-2), Phi(0-2); token 2 likewise
    sums = np.array(
        [PHI[1] + PHI[-2], PHI[-1] + PHI[1], PHI[-2] + PHI[-1]],
    )
    assert load.item() == pytest.approx(sums.var() / sums.mean() ** 2, rel=1e-5)


def test_moe_balance_counts_real_tokens_only(tiny_spec, tiny_adapters, monkeypatch):
    """Padding rows of a batch do not change the balance loss of its real tokens."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # the same (no) noise draw
    cfg = FinetuneConfig(mixture=MixtureConfig(kind="moe", top_k=1))
    model, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    layer = model.mixture_layers[0]
    layer.train()
    gen = torch.Generator().manual_seed(0)
    hidden = layer.query.in_features
    scores = torch.randn(1, 6, 3, generator=gen)
    query = torch.randn(1, 6, hidden, generator=gen)
    key = torch.randn(1, 6, 3, hidden, generator=gen)
    losses = []
    for length, mask in ((6, [[1, 1, 1, 1, 0, 0]]), (4, [[1, 1, 1, 1]])):
        set_context([layer], torch.tensor(mask), None)
        layer.weights(scores[:, :length], query[:, :length], key[:, :length])
        losses.append(layer.balance.item())
        layer.balance = None
    assert losses[0] > 0 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    set_context([layer], None, None)  # no mask known: every token counts
    layer.weights(scores, query, key)
    assert layer.balance.item() != pytest.approx(losses[0], rel=1e-6)


def test_routed_training_loss_and_prior_at_inference(tiny_spec, tiny_adapters):
    ids = torch.tensor([[101, 2054, 2003, 102], [101, 2054, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    to_0 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # routed: a training forward with links adds the loss; without links, nothing
    cfg = FinetuneConfig(mixture=MixtureConfig(routed=True, route_loss=2.0))
    model, fusion = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    model.train()
    model(ids, mask)
    assert mixture_aux_loss(model) is None
    model(ids, mask, links=to_0)
    loss = mixture_aux_loss(model)
    assert loss is not None and loss.item() > 0
    loss.backward()
    layer = model.mixture_layers[0]
    assert layer.query.weight.grad is not None and layer.query.weight.grad.abs().sum() > 0
    # at evaluation no loss, and no links needed
    model.eval()
    with torch.no_grad():
        model(ids, mask, links=to_0)
    assert mixture_aux_loss(model) is None

    # prior: the links move the weights at inference
    cfg = FinetuneConfig(mixture=MixtureConfig(prior=True, route_prior=30.0))
    model, fusion = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    model.eval()
    with torch.no_grad():
        a = model(ids, mask, output_mixture=True, links=to_0)[1][fusion]
        b = model(ids, mask, output_mixture=True, links=to_0.flip(-1))[1][fusion]
    wa, wb = a[max(a)]["output_adapter"], b[max(b)]["output_adapter"]
    assert (wa[0].argmax(-1) == 0).all() and (wb[0].argmax(-1) == 2).all()


def test_routing_diagnostics_by_hand():
    frame = pl.DataFrame({"id": ["a", "b", "c"], "partition": [0, 1, 1]})
    split = EncodedSplit(["a", "b", "c"], None, np.zeros(3), frame)  # type: ignore[arg-type]
    weights = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]], dtype=np.float32)
    links = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    d = routing_diagnostics(split, weights, links)
    assert d["routing_linked"] == 1.0  # a, b linked to 0 and weighted most on 0; c unlinked
    assert d["routing_true"] == pytest.approx(1 / 3)  # argmax 0, 0, 0 against 0, 1, 1
    h = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.7, 0.6, 0.5)]
    assert d["mixture_entropy"] == pytest.approx(np.mean(h), rel=1e-6)


def test_a_routed_run_reports_how_it_routes(tiny_spec, tiny_adapters, probe_dir, links, tmp_path):
    path, _ = links
    cfg = FinetuneConfig(
        epochs=1,
        batch_size=16,
        lr=5e-4,
        seed=0,
        save_model=False,
        eval_train=False,
        mixture=MixtureConfig(routed=True, prior=True),
    )
    with pytest.raises(MopError, match="needs the task's links"):
        finetune(tiny_spec, TASK, probe_dir, "mop", tiny_adapters, cfg, tmp_path / "none")
    m = finetune(
        tiny_spec, TASK, probe_dir, "mop", tiny_adapters, cfg, tmp_path / "run", links=path
    )
    assert 0.0 <= m["test_routing_linked"] <= 1.0
    assert m["test_routing_true"] == m["test_routing_linked"]  # probe links are the truth
    assert 0.0 < m["test_mixture_entropy"] <= math.log(3) + 1e-6
    mixture = pl.read_parquet(tmp_path / "run" / "mixture.parquet")
    test = pl.read_parquet(probe_dir / "test.parquet")
    assert mixture["linked"].to_list() == test["partition"].to_list()
    assert mixture["partition"].to_list() == test["partition"].to_list()
    np.testing.assert_allclose(np.array(mixture["mean_weights"].to_list()).sum(1), 1.0, rtol=1e-5)
    # links of another partitioning do not fit
    wrong = tmp_path / "wrong.parquet"
    pl.read_parquet(path).with_columns(
        route=pl.Series([[1.0, 0.0]] * pl.read_parquet(path).height, dtype=pl.Array(pl.Float32, 2))
    ).write_parquet(wrong)
    with pytest.raises(MopError, match="routes over 2 partitions"):
        finetune(tiny_spec, TASK, probe_dir, "mop", tiny_adapters, cfg, tmp_path / "w", links=wrong)
    # a -bm25 mixture reads the BM25 router's column of the same links
    bm25 = replace(cfg, mixture=replace(cfg.mixture, router="bm25"))
    m = finetune(
        tiny_spec, TASK, probe_dir, "mop", tiny_adapters, bm25, tmp_path / "bm25", links=path
    )
    assert m["config"]["mixture"]["router"] == "bm25"
    routes = pl.read_parquet(path).filter(pl.col("id").is_in(test["id"].to_list()))
    by_id = dict(zip(routes["id"], routes["bm25_route"].to_numpy().argmax(1), strict=True))
    mixture = pl.read_parquet(tmp_path / "bm25" / "mixture.parquet")
    assert mixture["linked"].to_list() == [by_id[i] for i in test["id"].to_list()]


@pytest.mark.slow
def test_the_workflow_runs_a_routed_mixture(finished_run, tmp_path):
    """Adding `softmax-routed-prior` to a finished tiny workflow links the probe to the
    partitions once and fine-tunes the routed runs with the links (a real run)."""
    import shutil

    import yaml

    from tests.conftest import snakemake

    work = tmp_path / "work"
    shutil.copytree(finished_run, work, symlinks=True)
    extra = tmp_path / "routed.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "finetune": {
                    "mixtures": [
                        "softmax",
                        "gumbel-t0.5",
                        "softmax-routed-prior",
                        "softmax-prior-bm25",
                    ]
                }
            }
        )
    )
    result = snakemake(work, "--configfile", str(work / "config" / "config.yaml"), str(extra))
    assert result.returncode == 0, result.stderr[-3000:]
    results = work / "results"
    coverage = json.loads((results / "links/probe/hpo-tiny/k2-metis/coverage.json").read_text())
    assert coverage["splits"]["test"]["linked_share"] == 1.0
    runs = results / "finetune/probe/tiny/mop-softmax-routed-prior/hpo-tiny/k2-metis"
    for seed in (0, 1):
        m = json.loads((runs / f"seed{seed}" / "metrics.json").read_text())
        assert m["config"]["mixture"]["routed"] and m["config"]["mixture"]["prior"]
        assert 0.0 <= m["test_routing_linked"] <= 1.0 and "test_mixture_entropy" in m
    bm25 = results / "finetune/probe/tiny/mop-softmax-prior-bm25/hpo-tiny/k2-metis/seed0"
    m = json.loads((bm25 / "metrics.json").read_text())
    assert m["config"]["mixture"]["router"] == "bm25" and m["test_linked_share"] == 1.0
    assert coverage["splits"]["test"]["bm25_linked_share"] == 1.0
    table6 = pl.read_csv(results / "tables/table6_mixtures.csv")
    routed = table6.filter(pl.col("Mixture") == "softmax-routed-prior")
    assert routed.height == 1 and float(routed["Routing"][0]) >= 0


def _without_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (training mode stays on): forwards become functions of the
    weights, so gradients can be compared exactly."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0


@pytest.fixture()
def deterministic_noise(monkeypatch):
    """Gumbel and MoE noise drawn as zeros: what the mixtures compute given their noise."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda t, *a, **k: t.fill_(1.0))


def test_auxiliary_losses_are_averaged_over_the_fusion_layers(
    tiny_spec, tiny_adapters, deterministic_noise
):
    """route_loss and the MoE balance weights mean the same at any depth: the loss is the
    layers' mean (it was their sum: 2 x on this 2-layer model, 12 x on BERT-base)."""
    ids = torch.tensor([[101, 2054, 2003, 102], [101, 2054, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    links = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    for mixture, weight in (
        (MixtureConfig(routed=True, route_loss=2.0, fusion_reg=False), 2.0),
        (MixtureConfig(kind="moe", top_k=1, importance=1.0, load=0.0), 1.0),
    ):
        model, fusion = build_classifier(
            tiny_spec, TASK, "mop", tiny_adapters, FinetuneConfig(mixture=mixture)
        )
        _without_dropout(model)
        model.train()
        _, att = model(ids, mask, output_mixture=True, links=links)
        layers = [torch.from_numpy(att[fusion][n]["output_adapter"]) for n in sorted(att[fusion])]
        assert len(layers) == 2
        if mixture.routed:
            per_layer = [route_loss(p, mask, links) for p in layers]
        else:
            per_layer = [cv_squared(p[mask.bool()].sum(0)) for p in layers]
        expected = weight * torch.stack(per_layer).mean()
        assert mixture_aux_loss(model).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "name", ["softmax", "gumbel-t0.5", "moe-k2", "softmax-routed", "gumbel-routed-prior"]
)
def test_gradient_accumulation_and_every_mixture(
    name, tiny_spec, tiny_adapters, probe_dir, links, deterministic_noise
):
    """One batch of 16 against two micro-batches of 8 (a third of the inputs unlinked, all
    in the first half): the same gradient for every mixture whose losses are linear in the
    batch, the routing loss included. MoE's balance losses are not, so for MoE grad_accum
    is part of what a run computes: the checkpoint fingerprint keeps it."""
    from mop.finetune import batch_loss, execution_keys
    from mop.fusion import parse_mixture
    from mop.linking import read_links
    from mop.models import load_tokenizer
    from mop.runtime import Runtime
    from mop.tasks.encode import load_split
    from mop.training import accumulate

    torch.manual_seed(0)  # the same weights whichever tests ran before
    cfg = FinetuneConfig(mixture=parse_mixture(name))
    split = load_split(probe_dir, "train", "single", tokenizer=load_tokenizer(tiny_spec))
    routes = read_links(links[0], split.ids, 3)
    routes[:5] = 0.0
    split = replace(split, links=routes)
    model, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    _without_dropout(model)
    model.train()
    rt = Runtime(torch.device("cpu"))

    def grads(grad_accum: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        accumulate(
            np.arange(16),
            grad_accum,
            lambda micro, batch: batch_loss(model, model, TASK, split, micro, batch, cfg, rt, 0),
        )
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, parts = grads(1), grads(2)
    assert whole.keys() == parts.keys() and len(whole) > 10
    close = all(torch.allclose(parts[n], whole[n], rtol=1e-4, atol=1e-6) for n in whole)
    if cfg.mixture.kind == "moe":
        assert not close
        assert "grad_accum" not in execution_keys(cfg)
    else:
        assert close
        assert "grad_accum" in execution_keys(cfg)
