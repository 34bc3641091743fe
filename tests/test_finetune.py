import numpy as np
import polars as pl
import pytest
import torch

from mop.errors import MopError
from mop.finetune import FinetuneConfig, build_classifier, finetune
from mop.fusion import MixtureConfig, MixtureFusion, fusion_layers
from mop.io import read_json
from mop.tasks import document_micro_f1, get_task, prepare_data
from mop.tasks.probe import prepare
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "tasks"

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
    ("method", "kind"),
    [
        ("base", "softmax"),
        ("adapter", "softmax"),
        ("mop", "softmax"),
        ("mop", "gumbel"),
        ("mop", "moe"),
    ],
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
    adapters = tiny_adapters[:1] if method == "adapter" else tiny_adapters
    m = finetune(tiny_spec, TASK, probe_dir, method, adapters, cfg, tmp_path)
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0]
    saved = read_json(tmp_path / "metrics.json")
    assert saved["test_accuracy"] == m["test_accuracy"]
    preds = pl.read_parquet(tmp_path / "predictions.parquet")
    test = preds.filter(pl.col("split") == "test")
    assert test.height == 40
    assert (test["pred"] == test["label"]).mean() == pytest.approx(m["test_accuracy"])
    # dev is reported from the best epoch's own pass, not predicted again
    assert m["dev_accuracy"] == max(h["dev_accuracy"] for h in m["history"])
    assert m["dev_accuracy"] == m["history"][m["best_epoch"]]["dev_accuracy"]
    dev = preds.filter(pl.col("split") == "dev")
    assert (dev["pred"] == dev["label"]).mean() == pytest.approx(m["dev_accuracy"])
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


def test_adapter_method_activates_exactly_one_adapter(tiny_spec, tiny_adapters):
    with pytest.raises(MopError, match="exactly one adapter"):
        build_classifier(tiny_spec, TASK, "adapter", tiny_adapters, FinetuneConfig())
    model, fusion = build_classifier(
        tiny_spec, TASK, "adapter", tiny_adapters[:1], FinetuneConfig()
    )
    assert fusion is None
    assert str(model.encoder.active_adapters) == "Stack[p0]"
    assert any(".adapters.p0." in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def hoc_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hoc")
    prepare_data("hoc", {"path": str(FIXTURES / "hoc")}, out)
    return out


@pytest.fixture(scope="module")
def medqa_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("medqa")
    options = {
        "path": str(FIXTURES / "medqa" / "questions" / "US"),
        "corpus": str(FIXTURES / "medqa" / "textbooks" / "en"),
        "top_k": 2,
    }
    prepare_data("medqa", options, out)
    return out


def test_multi_label_task_trains_and_merges_documents(tiny_spec, hoc_dir, tmp_path):
    task = get_task("hoc")
    cfg = FinetuneConfig(epochs=4, batch_size=4, lr=3e-3, warmup=0.0, seed=0, save_model=False)
    m = finetune(tiny_spec, task, hoc_dir, "base", [], cfg, tmp_path)
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0]
    preds = pl.read_parquet(tmp_path / "predictions.parquet").filter(pl.col("split") == "test")
    assert preds["pred"].list.len().unique().to_list() == [10]
    probs = np.asarray(preds["prob"].to_list())
    assert preds["pred"].to_list() == (probs >= 0.5).astype(int).tolist()
    assert m["test_micro_f1"] == pytest.approx(document_micro_f1(preds)["micro_f1"])
    assert "document" in preds.columns


def test_multiple_choice_task_trains_with_one_score_per_option(
    tiny_spec, tiny_adapters, medqa_dir, tmp_path
):
    task = get_task("medqa")
    cfg = FinetuneConfig(epochs=6, batch_size=4, lr=3e-3, warmup=0.0, seed=0, save_model=False)
    m = finetune(tiny_spec, task, medqa_dir, "base", [], cfg, tmp_path / "base")
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0]
    preds = pl.read_parquet(tmp_path / "base" / "predictions.parquet")
    probs = np.asarray(preds["prob"].to_list())
    assert probs.shape == (12 + 3 + 3, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert preds["pred"].to_list() == probs.argmax(1).tolist()
    cfg = FinetuneConfig(epochs=1, batch_size=4, lr=1e-3, seed=0, save_model=False)
    finetune(tiny_spec, task, medqa_dir, "mop", tiny_adapters, cfg, tmp_path / "mop")
    mix = pl.read_parquet(tmp_path / "mop" / "mixture.parquet")
    assert mix.height == 3 * 5 and mix["choice"].to_list() == [0, 1, 2, 3, 4] * 3


@pytest.mark.parametrize("task_name", ["hoc", "medqa"])
def test_same_seed_same_metrics_for_multi_label_and_choice(
    task_name, tiny_spec, hoc_dir, medqa_dir, tmp_path
):
    task_dir = hoc_dir if task_name == "hoc" else medqa_dir
    task = get_task(task_name)
    runs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        cfg = FinetuneConfig(epochs=2, batch_size=4, lr=1e-3, seed=seed, save_model=False)
        runs.append(finetune(tiny_spec, task, task_dir, "base", [], cfg, tmp_path / name))
    a, b, c = runs
    assert a["seed"] == b["seed"] == 5 and a["config"]["seed"] == 5
    assert a["history"] == b["history"]
    assert pl.read_parquet(tmp_path / "a" / "predictions.parquet").equals(
        pl.read_parquet(tmp_path / "b" / "predictions.parquet")
    )
    assert a["history"] != c["history"]


@pytest.fixture(scope="module")
def pair_probe_dir(small_kg, small_partition, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_pair")
    prepare(
        small_kg,
        small_partition,
        out,
        format="pair",
        max_questions={"train": 96, "dev": 40, "test": 40},
    )
    return out


@pytest.mark.parametrize("method", ["base", "mop", "oracle"])
def test_bilinear_head_and_the_oracle_train(
    method, tiny_spec, tiny_adapters, pair_probe_dir, tmp_path
):
    cfg = FinetuneConfig(
        epochs=2, batch_size=8, lr=5e-4, lr_head=1e-2, seed=1, head="bilinear", save_model=False
    )
    m = finetune(tiny_spec, TASK, pair_probe_dir, method, tiny_adapters, cfg, tmp_path)
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0]
    assert (tmp_path / "predictions.parquet").is_file()


def test_oracle_routes_each_example_to_its_own_adapter(tiny_spec, tiny_adapters):
    from mop.finetune import Classifier

    cfg = FinetuneConfig(head="linear")
    model, _ = build_classifier(tiny_spec, TASK, "oracle", tiny_adapters, cfg)
    assert isinstance(model, Classifier)
    model.eval()
    ids, mask = _batch(tiny_spec, n=4)
    route = np.array([0, 2, 1, 2])
    with torch.no_grad():
        routed, _ = model(ids, mask, route=route)
        for k in range(3):
            model.encoder.set_active_adapters(f"p{k}")
            alone, _ = model(ids, mask)
            sel = route == k
            torch.testing.assert_close(routed[torch.from_numpy(sel)], alone[torch.from_numpy(sel)])
        model.encoder.set_active_adapters("p0")
        p0, _ = model(ids, mask)
    assert not torch.allclose(routed[1], p0[1])


def test_zero_learning_rate_freezes_that_part(tiny_spec, tiny_adapters):
    from mop.finetune import _param_groups

    cfg = FinetuneConfig(lr=0.0, lr_adapters=0.0, lr_fusion=1e-3, lr_head=1e-3)
    model, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    names = {g["name"] for g in _param_groups(model, cfg)}
    assert names <= {"fusion", "fusion_no_decay", "head", "head_no_decay"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        "adapter_fusion_layer" in n or n.startswith("head.") for n in trainable
    )
