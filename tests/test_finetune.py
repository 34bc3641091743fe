import numpy as np
import polars as pl
import pytest
import torch

from mop.errors import MopError
from mop.finetune import FinetuneConfig, build_classifier, finetune
from mop.fusion import MixtureConfig, MixtureFusion, fusion_layers
from mop.io import read_json
from mop.plan import Run
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
    assert all(isinstance(m, MixtureFusion) for _, m in layers)
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
        mixture=MixtureConfig(kind=kind),
    )
    adapters = tiny_adapters[:1] if method == "adapter" else tiny_adapters
    m = finetune(tiny_spec, TASK, probe_dir, method, adapters, cfg, tmp_path)
    assert all(np.isfinite(h["train_loss"]) for h in m["history"])
    # Everything trains (the paper's setting): every part of the saved best model moved
    # away from the model the run started from (same seed, same construction).
    from safetensors.torch import load_file

    from mop.finetune import model_part
    from mop.runtime import seed_all

    seed_all(cfg.seed)
    start, _ = build_classifier(tiny_spec, TASK, method, adapters, cfg)
    saved_weights = load_file(tmp_path / "model.safetensors")
    moved = {
        model_part(k)
        for k, v in start.state_dict().items()
        if k in saved_weights and not torch.equal(v, saved_weights[k])
    }
    parts = {"base", "head"} | ({"adapters"} if method != "base" else set())
    assert moved == parts | ({"fusion"} if method == "mop" else set())
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
    from mop.finetune import classifier_groups

    cfg = FinetuneConfig(lr=1e-5, lr_adapters=2e-4, lr_fusion=3e-4, lr_head=4e-4)
    model, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    groups = {g["name"]: g for g in classifier_groups(model, cfg)}
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
    from mop.finetune import classifier_groups

    cfg = FinetuneConfig(lr=0.0, lr_adapters=0.0, lr_fusion=1e-3, lr_head=1e-3)
    model, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    names = {g["name"] for g in classifier_groups(model, cfg)}
    assert names <= {"fusion", "fusion_no_decay", "head", "head_no_decay"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        "adapter_fusion_layer" in n or n.startswith("head.") for n in trainable
    )


def _finetune_cmd(task_dir, adapters, out, models, **options) -> list[str]:
    import json
    import sys

    opts = {"epochs": 3, "batch_size": 8, "lr": 5e-4, "checkpoint_every": 5, "save_model": True}
    return [
        sys.executable,
        "-m",
        "mop.cli",
        "finetune",
        "--task-dir",
        str(task_dir),
        "--adapters",
        *map(str, adapters),
        "--models",
        json.dumps(models),
        "--device",
        "cpu",
        "--options",
        json.dumps(opts | options),
        "--out",
        str(out / RUN.folder("results")),
    ]


# the run the command-line tests make: its folder says task, model, method, mixture, seed
RUN = Run("mop", task="probe", model="tiny", mixture="gumbel", kg="g", k=3, scheme="metis", seed=4)


def _same_run(a, b) -> None:
    """Two runs' outputs are identical: predictions, weights, metrics but timings."""
    from safetensors.torch import load_file

    a, b = a / RUN.folder("results"), b / RUN.folder("results")
    assert pl.read_parquet(a / "predictions.parquet").equals(
        pl.read_parquet(b / "predictions.parquet")
    )
    assert pl.read_parquet(a / "mixture.parquet").equals(pl.read_parquet(b / "mixture.parquet"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)
    ma, mb = read_json(a / "metrics.json"), read_json(b / "metrics.json")
    for key in ("history", "best_epoch", "steps", "dev_accuracy", "test_accuracy"):
        assert ma[key] == mb[key], key


def test_killed_and_preempted_fine_tuning_resumes_to_the_uninterrupted_result(
    tiny_adapters, probe_dir, models, tmp_path, monkeypatch
):
    """SIGTERM (scancel, preemption): a checkpoint and exit 143; SIGKILL: the last
    checkpoint. Either way the same command ends with the uninterrupted run's outputs."""
    import signal
    import subprocess

    from tests.conftest import checkpoint_step, kill_at_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(
        _finetune_cmd(probe_dir, tiny_adapters, full, models), check=True, capture_output=True
    )
    # SIGTERM right after the first checkpoint: the job writes one more and exits 143.
    proc = subprocess.Popen(
        _finetune_cmd(probe_dir, tiny_adapters, cut, models),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = kill_at_checkpoint(proc, cut / RUN.folder("results") / "checkpoint", signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr.read()[-2000:]
    assert "stopped by SIGTERM" in proc.stderr.read()
    second = checkpoint_step(cut / RUN.folder("results") / "checkpoint")
    assert second >= first and not (cut / RUN.folder("results") / "metrics.json").exists()
    # SIGKILL at a later checkpoint: nothing but the checkpoint survives.
    proc = subprocess.Popen(
        _finetune_cmd(probe_dir, tiny_adapters, cut, models),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import time

    deadline = time.time() + 120
    while (
        checkpoint_step(cut / RUN.folder("results") / "checkpoint") or 0
    ) <= second and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    step = checkpoint_step(cut / RUN.folder("results") / "checkpoint")
    assert step is not None and step > second, "the job finished before the second kill"
    result = subprocess.run(
        _finetune_cmd(probe_dir, tiny_adapters, cut, models),
        check=True,
        capture_output=True,
        text=True,
    )
    assert f"resuming from step {step}" in result.stderr
    assert "epoch 3/3: train loss" in result.stderr  # one line per epoch
    assert not (cut / RUN.folder("results") / "checkpoint").exists()
    _same_run(full, cut)


def test_fine_tuning_on_an_unavailable_device_stops_with_one_line(
    tiny_adapters, probe_dir, models, tmp_path
):
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    cmd = _finetune_cmd(probe_dir, tiny_adapters, tmp_path / "run", models)
    cmd[cmd.index("--device") + 1] = "cuda"
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1
    errors = [x for x in result.stderr.splitlines() if x.startswith("mop: error:")]
    assert len(errors) == 1 and "runtime.device: cuda asked for" in errors[0]
    assert not (tmp_path / "run" / RUN.folder("results") / "metrics.json").exists()


@pytest.fixture(scope="module")
def pubmedqa_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pubmedqa")
    prepare_data("pubmedqa", {"path": str(FIXTURES / "pubmedqa")}, out)
    return out / "fold0"


@pytest.mark.parametrize("which", ["pair probe", "pubmedqa"])
def test_sentence_pairs_reach_the_encoder_with_segment_1_on_the_second_text(
    which, tiny_spec, pair_probe_dir, pubmedqa_dir
):
    from mop.finetune import load_data, predict
    from mop.models import load_tokenizer

    task = TASK if which == "pair probe" else get_task("pubmedqa")
    task_dir = pair_probe_dir if which == "pair probe" else pubmedqa_dir
    tok = load_tokenizer(tiny_spec)
    cfg = FinetuneConfig(max_length=64)
    data = load_data(tiny_spec, task, task_dir, "base", 0, cfg, tok)
    test = data["test"]
    model, _ = build_classifier(tiny_spec, task, "base", [], cfg)
    seen = []

    def grab(module, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["token_type_ids"].clone()))

    model.encoder.embeddings.register_forward_pre_hook(grab, with_kwargs=True)
    predict(model, task, test, tok.pad_token_id, batch_size=64)
    ids, types = seen[0]
    assert types.max() == 1
    row = test.frame.row(0, named=True)
    expected = tok(row["text_a"], row["text_b"], truncation="longest_first", max_length=64)
    # the sequence of example 0 in the batch, without padding
    found = [
        i
        for i in range(ids.shape[0])
        if ids[i, : len(expected["input_ids"])].tolist() == expected["input_ids"]
    ]
    assert found, "example 0 not in the first batch"
    i, n = found[0], len(expected["input_ids"])
    assert types[i, :n].tolist() == expected["token_type_ids"]
    second = types[i, :n].tolist().index(1)
    sep = tok.sep_token_id
    assert ids[i, second - 1] == sep and ids[i, n - 1] == sep  # segment 1: text_b [SEP]
    assert (types[i, n:] == 0).all()  # padding is segment 0


def test_pooler_pooling_reads_berts_pooler_output(tiny_spec):
    cfg = FinetuneConfig(pooling="pooler")
    model, _ = build_classifier(tiny_spec, TASK, "base", [], cfg)
    ids, mask = _batch(tiny_spec)
    model.eval()
    with torch.no_grad():
        pooled, _ = model.pool({"input_ids": ids, "attention_mask": mask})
        expected = model.encoder(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled, model.encoder(input_ids=ids).last_hidden_state[:, 0])


def test_tokens_written_once_give_the_same_run_and_stale_tokens_are_refused(
    tiny_spec, tiny_adapters, pair_probe_dir, tmp_path
):
    import shutil

    from mop.tasks.encode import write_encoding

    record = write_encoding(pair_probe_dir, "single", tiny_spec, 64, tmp_path / "enc")
    assert set(record["splits"]) == {"train", "dev", "test"} and record["max_length"] == 64
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=5e-4, max_length=64, save_model=False)
    a = finetune(tiny_spec, TASK, pair_probe_dir, "base", [], cfg, tmp_path / "a")
    b = finetune(
        tiny_spec,
        TASK,
        pair_probe_dir,
        "base",
        [],
        cfg,
        tmp_path / "b",
        encoded_dir=tmp_path / "enc",
    )
    assert a["history"] == b["history"]
    with pytest.raises(MopError, match="max_length 64, this run asks for 32"):
        finetune(
            tiny_spec,
            TASK,
            pair_probe_dir,
            "base",
            [],
            replace_cfg(cfg, max_length=32),
            tmp_path / "c",
            encoded_dir=tmp_path / "enc",
        )
    changed = tmp_path / "changed"
    shutil.copytree(pair_probe_dir, changed)
    dev = pl.read_parquet(changed / "dev.parquet")
    dev.head(dev.height - 1).write_parquet(changed / "dev.parquet")
    with pytest.raises(MopError, match=r"enc/dev\.parquet: tokens were made from another"):
        finetune(
            tiny_spec, TASK, changed, "base", [], cfg, tmp_path / "d", encoded_dir=tmp_path / "enc"
        )
    assert not (tmp_path / "d" / "metrics.json").exists()


def replace_cfg(cfg, **changes):
    from dataclasses import replace

    return replace(cfg, **changes)


def test_bf16_autocast_path_runs_on_the_cpu(tiny_spec, tiny_adapters, probe_dir, tmp_path):
    """The precision path a GPU takes, exercised on the CPU: same outputs, bf16 recorded."""
    from mop.runtime import Runtime

    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=5e-4, seed=0, save_model=False)
    m = finetune(
        tiny_spec,
        TASK,
        probe_dir,
        "mop",
        tiny_adapters,
        cfg,
        tmp_path,
        runtime=Runtime.create("cpu", "bf16"),
    )
    assert m["runtime"]["precision"] == "bf16" and m["runtime"]["device"] == "cpu"
    assert np.isfinite(m["history"][0]["train_loss"])
    mix = pl.read_parquet(tmp_path / "mixture.parquet")
    np.testing.assert_allclose(np.asarray(mix["weights"].to_list()).sum(1), 1.0, rtol=1e-3)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["base", "mop", "oracle"])
def test_fine_tuning_runs_on_cuda(method, tiny_spec, tiny_adapters, pair_probe_dir, tmp_path):
    from mop.runtime import Runtime

    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=5e-4, lr_head=1e-2, head="bilinear")
    rt = Runtime.create("cuda", "auto")
    m = finetune(tiny_spec, TASK, pair_probe_dir, method, tiny_adapters, cfg, tmp_path, runtime=rt)
    assert m["runtime"]["device"].startswith("cuda") and m["runtime"]["peak_memory_mb"] > 0
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    assert (tmp_path / "model.safetensors").is_file()


def test_eval_train_false_skips_the_training_split_pass(tiny_spec, probe_dir, tmp_path):
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=5e-4, save_model=False, eval_train=False)
    m = finetune(tiny_spec, TASK, probe_dir, "base", [], cfg, tmp_path)
    assert "train_accuracy" not in m and "dev_accuracy" in m and "test_accuracy" in m
    splits = pl.read_parquet(tmp_path / "predictions.parquet")["split"].unique().sort()
    assert splits.to_list() == ["dev", "test"]


def test_a_run_at_another_k_is_routed_and_judged_by_its_own_partitions(
    tiny_spec, small_kg, probe_dir, tmp_path
):
    """The probe is built on one partitioning; an oracle or MoP run on another (a K sweep)
    must route and score against the partitions its adapters were trained on."""
    from mop.finetune import load_data, routing_diagnostics
    from mop.models import load_tokenizer
    from mop.partition import read_membership, run_partition

    other = tmp_path / "partition"
    run_partition(small_kg, other, 3, seed=7)
    member = read_membership(other)
    cfg = FinetuneConfig(max_length=32)
    tok = load_tokenizer(tiny_spec)
    data = load_data(tiny_spec, TASK, probe_dir, "oracle", 3, cfg, tok, partition_dir=other)
    test = data["test"]
    disease, phenotype = (test.frame[c].to_numpy() for c in ("disease", "phenotype"))
    inside = member[disease] == member[phenotype]
    assert 0 < inside.mean() < 1  # the other partitioning cut some of the probe's facts
    assert (test.route[inside] == member[disease][inside]).all()
    assert (test.route[~inside] == member[disease][~inside]).all()  # the disease's adapter
    assert (test.frame["partition"].to_numpy()[~inside] == -1).all()
    own = load_data(tiny_spec, TASK, probe_dir, "oracle", 3, cfg, tok)["test"]
    assert not np.array_equal(own.route, test.route)  # the probe's own partitions differ
    # a mixture that always weighs the true partition of the run's K routes 100%
    weights = np.eye(3)[np.where(inside, member[disease], 0)]
    diag = routing_diagnostics(test, weights, None)
    assert diag["routing_true"] == 1.0
    assert diag["facts_inside"] == pytest.approx(inside.mean())


def test_linking_diagnostics_split_the_metric_by_whether_an_input_was_linked(tiny_spec, probe_dir):
    from dataclasses import replace

    from mop.finetune import evaluate, linking_diagnostics, load_data
    from mop.models import load_tokenizer

    cfg = FinetuneConfig(max_length=32)
    test = load_data(tiny_spec, TASK, probe_dir, "base", 0, cfg, load_tokenizer(tiny_spec))["test"]
    n = len(test)
    true = test.frame["partition"].to_numpy()
    links = np.zeros((n, 3), dtype=np.float32)
    linked = np.arange(n) % 4 != 0  # a quarter unlinked
    links[linked, true[linked]] = 1.0
    links[1] = np.eye(3)[(true[1] + 1) % 3]  # one linked input whose top link is wrong
    split = replace(test, links=links)
    probs = np.zeros((n, 2))
    probs[np.arange(n), np.where(linked, test.labels, 1 - test.labels)] = 1.0  # right iff linked
    _, frame = evaluate(TASK, split, probs)
    d = linking_diagnostics(TASK, split, frame)
    assert d["linked_share"] == pytest.approx(linked.mean())
    assert d["top_link_true"] == pytest.approx(1 - 1 / linked.sum())
    assert d["linked_accuracy"] == 1.0 and d["unlinked_accuracy"] == 0.0
