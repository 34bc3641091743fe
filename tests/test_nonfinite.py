"""A diverged run stops: a NaN or infinite training loss ends the job at that step with
one message (run, step, last good checkpoint) and no metrics; non-finite predictions are
an error too. On the CPU, with the NaN put there on purpose."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mop.errors import MopError
from mop.finetune import FinetuneConfig, build_classifier, finetune, predict
from mop.models import load_tokenizer
from mop.pretrain import PretrainConfig, load_partition_data, pretrain_partition
from mop.tasks import get_task
from mop.tasks.encode import load_split
from mop.tasks.probe import prepare

TASK = get_task("probe")


@pytest.fixture(scope="module")
def probe_dir(small_kg, small_partition, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    prepare(small_kg, small_partition, out, max_questions={"train": 48, "dev": 16, "test": 16})
    return out


def test_pretraining_that_diverges_stops_at_the_step(
    small_kg, small_partition, small_tokens, tiny_spec, tmp_path
):
    """An absurd learning rate: step 1 is applied and checkpointed, its weights overflow,
    and step 2's loss is not finite. The job stops there, names the checkpoint of step 1
    (kept), and writes no metrics, adapter or head."""
    data = load_partition_data(small_tokens, small_partition, small_kg, 0)
    cfg = PretrainConfig(epochs=1, lr=1e30, batch_size=8, checkpoint_every=1)
    with pytest.raises(MopError) as err:
        pretrain_partition(tiny_spec, data, cfg, tmp_path / "p0")
    message = str(err.value)
    assert f"pretrain {tmp_path / 'p0'}" in message
    step = int(message.split(" at step ")[1].split(";")[0])
    assert step >= 2
    assert f"last good checkpoint: {tmp_path / 'p0' / 'checkpoint'}/step-{step - 1:08d}" in message
    assert (tmp_path / "p0" / "checkpoint" / f"step-{step - 1:08d}").is_dir()
    for name in ("metrics.json", "head.safetensors", "adapter", "card.json"):
        assert not (tmp_path / "p0" / name).exists()


def test_finetuning_with_a_nan_adapter_stops_before_its_first_step(
    tiny_spec, tiny_adapters, probe_dir, tmp_path
):
    """One adapter holding a NaN (as a diverged pretraining would leave it): the first
    loss is NaN, nothing was checkpointed, no metrics or predictions appear."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapters[1], bad)
    weights = load_file(bad / "adapter.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, bad / "adapter.safetensors")
    cfg = FinetuneConfig(epochs=1, batch_size=16, save_model=False, eval_train=False)
    out = tmp_path / "run"
    adapters = [tiny_adapters[0], bad, tiny_adapters[2]]
    with pytest.raises(MopError, match=r"training loss is nan at step 1; no checkpoint"):
        finetune(tiny_spec, TASK, probe_dir, "mop", adapters, cfg, out)
    assert not (out / "metrics.json").exists() and not (out / "predictions.parquet").exists()


def test_non_finite_predictions_are_an_error(tiny_spec, probe_dir):
    """A model that predicts NaN gives no metrics: predict stops and says how many."""
    model, _ = build_classifier(tiny_spec, TASK, "base", [], FinetuneConfig())
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    tok = load_tokenizer(tiny_spec)
    split = load_split(probe_dir, "dev", "single", tokenizer=tok, max_length=64)
    with pytest.raises(MopError, match=rf"{len(split)} of {len(split)} examples got non-finite"):
        predict(model, TASK, split, tok.pad_token_id, 8)
    model.head.bias.data.zero_()
    probs, _, _ = predict(model, TASK, split, tok.pad_token_id, 8)
    assert np.isfinite(probs).all()
