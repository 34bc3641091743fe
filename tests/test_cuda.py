"""The training and inference paths on a CUDA device, in bf16 autocast: pretraining (its
probe scored in fp32), every mixture in fine-tuning, and an export reloaded on the GPU.
Skipped without a GPU (never required in CI, which has none); `benchmarks/gpu_check.sh`
and a lent GPU machine run them."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

import mop
from mop.export import export_run
from mop.finetune import FinetuneConfig, finetune
from mop.fusion import MixtureConfig
from mop.pretrain import (
    EntityPredictor,
    PretrainConfig,
    build_adapter_model,
    knowledge_probe,
    load_entity_predictor,
    load_partition_data,
    pretrain_partition,
)
from mop.tasks import get_task
from mop.tasks.probe import prepare
from mop.training import Runtime

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TASK = get_task("probe")


@pytest.fixture(scope="module")
def gpu() -> Runtime:
    rt = Runtime.create("cuda", "auto")
    assert rt.precision == "bf16"  # auto is bf16 on CUDA
    return rt


@pytest.fixture(scope="module")
def pair_probe(small_kg, small_partition, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-probe")
    prepare(
        small_kg,
        small_partition,
        out,
        format="pair",
        max_questions={"train": 96, "dev": 40, "test": 40},
    )
    return out


def test_pretraining_runs_in_bf16_and_reloads_on_the_cpu(
    gpu, small_kg, small_partition, small_tokens, tiny_spec, tmp_path
):
    data = load_partition_data(small_tokens, small_partition, small_kg, 1)
    cfg = PretrainConfig(epochs=2, lr=1e-3, batch_size=16, seed=4)
    metrics = pretrain_partition(tiny_spec, data, cfg, tmp_path, runtime=gpu)
    assert metrics["runtime"]["device"].startswith("cuda")
    assert metrics["runtime"]["precision"] == "bf16"
    assert metrics["loss_curve"][-1]["loss"] < metrics["loss_curve"][0]["loss"]
    # The weights written from the GPU run give, on the CPU in fp32, the probe figure the
    # GPU run reported (its scores are fp32 there too; bf16 forwards differ slightly).
    here = load_entity_predictor(tiny_spec, tmp_path / "adapter", tmp_path / "head.safetensors")
    again = knowledge_probe(here, data, np.arange(len(data.seqs)), 0)
    assert again["hits_at_10"] == pytest.approx(metrics["probe"]["train"]["hits_at_10"], abs=0.05)


def test_the_probe_scores_in_fp32_under_cuda_bf16(
    gpu, small_kg, small_partition, small_tokens, tiny_spec
):
    """Two head rows 0.1% apart tie in bf16 logits; the probe still ranks them apart."""
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
    model.to(gpu.device)
    ids, mask = data.seqs.pad(rows)
    with torch.no_grad(), gpu.forward_context():
        logits = model(gpu.to_device(ids), gpu.to_device(mask)).float().cpu()
    assert logits[0, target] == logits[0, other]  # the trap is real on this device
    probe = knowledge_probe(model, data, rows, 0, runtime=gpu)
    assert probe["hits_at_1"] == 0.0 and probe["mrr"] == pytest.approx(0.5)


@pytest.mark.parametrize("mixture", ["softmax", "gumbel", "moe"])
def test_every_mixture_trains_on_cuda_and_its_export_predicts_the_same_there(
    mixture, gpu, tiny_spec, tiny_adapters, pair_probe, tmp_path
):
    cfg = FinetuneConfig(
        epochs=2,
        batch_size=8,
        lr=5e-4,
        lr_head=1e-2,
        head="bilinear",
        eval_train=False,
        mixture=MixtureConfig(kind=mixture),
    )
    run = tmp_path / "run"
    m = finetune(tiny_spec, TASK, pair_probe, "mop", tiny_adapters, cfg, run, runtime=gpu)
    assert m["runtime"]["device"].startswith("cuda") and m["runtime"]["peak_memory_mb"] > 0
    assert np.isfinite([h["train_loss"] for h in m["history"]]).all()
    weights = np.asarray(pl.read_parquet(run / "mixture.parquet")["weights"].to_list())
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-3)

    export_run(run, tmp_path / "export")
    model = mop.load(tmp_path / "export", device="cuda")
    test = pl.read_parquet(pair_probe / "test.parquet")
    probs = model.predict_records(test.select("text_a", "text_b", "candidate").to_dicts())
    frame = pl.read_parquet(run / "predictions.parquet").filter(pl.col("split") == "test")
    expected = np.array(frame["prob"].to_list())
    np.testing.assert_allclose(probs, expected, atol=2e-2)  # bf16 forwards, both on cuda
