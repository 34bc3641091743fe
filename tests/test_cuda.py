"""The training and inference paths on a CUDA device, in bf16 autocast: pretraining, every
mixture in fine-tuning, and an export reloaded on the GPU (the probe's fp32 scores under
CUDA bf16: test_pretrain.py).
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
    PretrainConfig,
    knowledge_probe,
    load_entity_predictor,
    load_partition_data,
    pretrain_partition,
)
from mop.runtime import Runtime
from mop.tasks import get_task

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


@pytest.mark.parametrize("mixture", ["softmax", "gumbel", "moe"])
def test_every_mixture_trains_on_cuda_and_its_export_predicts_the_same_there(
    mixture, gpu, tiny_spec, tiny_adapters, pair_probe_dir, tmp_path
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
    m = finetune(tiny_spec, TASK, pair_probe_dir, "mop", tiny_adapters, cfg, run, runtime=gpu)
    assert m["runtime"]["device"].startswith("cuda") and m["runtime"]["peak_memory_mb"] > 0
    assert np.isfinite([h["train_loss"] for h in m["history"]]).all()
    weights = np.asarray(pl.read_parquet(run / "mixture.parquet")["weights"].to_list())
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-3)

    export_run(run, tmp_path / "export")
    model = mop.load(tmp_path / "export", device="cuda")
    test = pl.read_parquet(pair_probe_dir / "test.parquet")
    probs = model.predict_records(test.select("text_a", "text_b", "candidate").to_dicts())
    frame = pl.read_parquet(run / "predictions.parquet").filter(pl.col("split") == "test")
    expected = np.array(frame["prob"].to_list())
    np.testing.assert_allclose(probs, expected, atol=2e-2)  # bf16 forwards, both on cuda
