import numpy as np
import polars as pl
import pytest
import torch

from mop.finetune import FinetuneConfig, build_classifier, finetune
from mop.fusion import MixtureConfig, MixtureFusion, fusion_layers
from mop.io import read_json
from mop.tasks import get_task
from mop.tasks.probe import prepare

TASK = get_task("probe")


@pytest.fixture(scope="module")
def probe_dir(small_kg, small_partition, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    prepare(small_kg, small_partition, out, max_questions={"train": 96, "dev": 40, "test": 40})
    return out


def _batch(spec, n=3):
    from mop.models import load_tokenizer

    enc = load_tokenizer(spec)(["Is fever a feature of flu?"] * n, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("kind", ["softmax", "gumbel", "moe"])
def test_mixture_weights(kind, tiny_spec, tiny_adapters):
    cfg = FinetuneConfig(mixture=MixtureConfig(kind=kind, top_k=2, tau=0.5))
    model, fusion = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    assert all(p.requires_grad for p in model.parameters())
    layers = fusion_layers(model.encoder, fusion)
    assert len(layers) == model.encoder.config.num_hidden_layers
    assert all(isinstance(m, MixtureFusion) == (kind != "softmax") for _, m in layers)
    ids, mask = _batch(tiny_spec)
    model.eval()
    with torch.no_grad():
        _, att = model(ids, mask, output_mixture=True)
        _, att2 = model(ids, mask, output_mixture=True)
    w = att[fusion][max(att[fusion])]["output_adapter"]
    assert w.shape == (3, ids.shape[1], 3)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(w, att2[fusion][max(att2[fusion])]["output_adapter"])
    if kind == "moe":
        assert ((w > 0).sum(-1) == 2).all()


def test_gumbel_and_moe_are_random_only_while_training(tiny_spec, tiny_adapters):
    for kind in ("gumbel", "moe"):
        cfg = FinetuneConfig(mixture=MixtureConfig(kind=kind, top_k=1))
        model, fusion = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
        for _, m in fusion_layers(model.encoder, fusion):
            if kind == "moe":
                torch.nn.init.normal_(m.noise.weight, std=1.0)
        ids, mask = _batch(tiny_spec)
        model.train()
        model.dropout.p = 0.0
        with torch.no_grad():
            a = model(ids, mask, output_mixture=True)[1][fusion]
            b = model(ids, mask, output_mixture=True)[1][fusion]
        last = max(a)
        assert not np.array_equal(a[last]["output_adapter"], b[last]["output_adapter"])


@pytest.mark.parametrize(
    ("method", "kind"), [("base", "softmax"), ("mop", "softmax"), ("mop", "gumbel"), ("mop", "moe")]
)
def test_every_method_trains_and_writes_its_outputs(
    method, kind, tiny_spec, tiny_adapters, probe_dir, tmp_path
):
    cfg = FinetuneConfig(
        epochs=3,
        batch_size=8,
        lr=5e-4,
        seed=1,
        save_model=True,
        mixture=MixtureConfig(kind=kind, balance=0.01),
    )
    m = finetune(tiny_spec, TASK, probe_dir, method, tiny_adapters, cfg, tmp_path)
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0]
    saved = read_json(tmp_path / "metrics.json")
    assert saved["test_accuracy"] == m["test_accuracy"]
    preds = pl.read_parquet(tmp_path / "predictions.parquet")
    test = preds.filter(pl.col("split") == "test")
    assert test.height == 40
    assert (test["pred"] == test["label"]).mean() == pytest.approx(m["test_accuracy"])
    assert (tmp_path / "model.safetensors").is_file()
    if method == "mop":
        mix = pl.read_parquet(tmp_path / "mixture.parquet")
        assert mix.height == 40 and mix["weights"].list.len().unique().to_list() == [3]


def test_same_seed_same_metrics(tiny_spec, tiny_adapters, probe_dir, tmp_path):
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=5e-4, seed=3, save_model=False)
    a = finetune(tiny_spec, TASK, probe_dir, "mop", tiny_adapters, cfg, tmp_path / "a")
    b = finetune(tiny_spec, TASK, probe_dir, "mop", tiny_adapters, cfg, tmp_path / "b")
    assert a["history"] == b["history"]
    assert pl.read_parquet(tmp_path / "a" / "predictions.parquet").equals(
        pl.read_parquet(tmp_path / "b" / "predictions.parquet")
    )


def test_separate_learning_rates(tiny_spec, tiny_adapters):
    from mop.finetune import _param_groups

    cfg = FinetuneConfig(lr=1e-5, lr_adapters=2e-4, lr_fusion=3e-4, lr_head=4e-4)
    model, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    groups = {g["name"]: g for g in _param_groups(model, cfg)}
    assert groups["base"]["lr"] == 1e-5 and groups["adapters"]["lr"] == 2e-4
    assert groups["fusion"]["lr"] == 3e-4 and groups["head"]["lr"] == 4e-4
    assert groups["base_no_decay"]["weight_decay"] == 0.0
    n = sum(len(g["params"]) for g in groups.values())
    assert n == sum(1 for _ in model.parameters())
