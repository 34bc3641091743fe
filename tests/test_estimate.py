"""The cost model behind `mop plan --estimate`, against hand-computed figures."""

import pytest

from mop.errors import MopError
from mop.estimate import Shape, estimate, measured_mfu, train_flops_per_token


def test_flops_per_token_by_hand():
    shape = Shape(layers=2, hidden=8, intermediate=32, source="config")
    # per layer: attention 4 * 64 + feed-forward 2 * 8 * 32 = 768 weights
    train, forward = train_flops_per_token(shape, 10, 0, 8, False, frozen_base=False)
    attention = 2 * 10 * 8  # 2 x length x hidden multiply-adds per layer
    assert forward == 2 * 2 * (768 + attention) == 3712
    assert train == 3 * forward
    # MoP: 3 adapters (2 * 8 * 1 each), fusion query + 3 keys + 3 values (7 * 64) and its
    # scores and mixture (2 * 3 * 8), in each of 2 layers
    train, forward = train_flops_per_token(shape, 10, 3, 8, True, frozen_base=False)
    assert forward == 2 * 2 * (768 + 3 * 16 + 7 * 64 + 48 + attention)
    # a frozen base model computes no gradients for its own weights
    train, forward = train_flops_per_token(shape, 10, 1, 8, False, frozen_base=True)
    assert train == 3 * forward - 2 * 2 * 768


def test_mop_at_k20_costs_four_times_bert_base_per_token():
    bert = Shape(12, 768, 3072, "config")
    base = train_flops_per_token(bert, 512, 0, 8, False, False)[0]
    mop = train_flops_per_token(bert, 512, 20, 8, True, False)[0]
    assert mop / 1e9 == pytest.approx(2.52, abs=0.01) and mop / base == pytest.approx(4.4, abs=0.1)


def test_hours_follow_the_card_and_utilisation(models):
    config = {
        "results": "/nonexistent",
        "models": models,
        "pretrain": {"reduction_factor": 8, "bidirectional": False, "epochs": 1},
        "finetune": {"epochs": 2, "max_length": 64},
        "tasks": {
            "probe": {"kg": "g", "k": 2, "max_questions": {"train": 100, "dev": 10, "test": 10}}
        },
        "kgs": {},
    }
    jobs = [("finetune_base", {"task": "probe", "model": "tiny", "seed": "0"})] * 3
    a = estimate(config, jobs, "a100", 0.3)
    b = estimate(config, jobs, "h100", 0.3)
    c = estimate(config, jobs, "h100", 0.6)
    assert a.jobs == {"finetune_base": 3}
    assert a.gpu_hours["finetune_base"] / b.gpu_hours["finetune_base"] == pytest.approx(989 / 312)
    assert b.gpu_hours["finetune_base"] == pytest.approx(2 * c.gpu_hours["finetune_base"])
    # 3 runs x (2 epochs x 100 train + 2 x 10 dev + 100 + 10 evaluated) questions x 16 tokens
    shape = Shape(2, 64, 128, "config")
    train, forward = train_flops_per_token(shape, 16, 0, 8, False, False)
    flops = 3 * 16 * (200 * train + 130 * forward)
    assert a.flops["finetune_base"] == pytest.approx(flops)
    with pytest.raises(MopError, match="unknown card 'tpu'"):
        estimate(config, jobs, "tpu")


def test_measured_utilisation_is_read_from_the_benchmark_line(tmp_path):
    out = tmp_path / "bench.txt"
    out.write_text('noise\n{"benchmark": "finetune_throughput_gpu", "mfu": 0.41}\n')
    assert measured_mfu(out) == 0.41
    out.write_text('{"benchmark": "x"}\n')
    with pytest.raises(MopError, match="no benchmark JSON line with an mfu"):
        measured_mfu(out)
