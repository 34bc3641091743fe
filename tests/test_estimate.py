"""The cost model behind `mop plan --estimate`, against hand-computed figures."""

import pytest

from mop.errors import MopError
from mop.estimate import Shape, estimate, measured_mfu, model_shape, train_flops_per_token
from mop.flops import gpu_peak, shape_from_config


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
    out.write_text('noise\n{"benchmark": "finetune_gpu", "mfu": 0.41}\n')
    assert measured_mfu(out) == 0.41
    # against the data-sheet peak the estimate multiplies by, where the line has it
    out.write_text('{"benchmark": "finetune_gpu", "mfu": 0.6, "peak_mfu": 0.35}\n')
    assert measured_mfu(out) == 0.35
    out.write_text('{"benchmark": "x"}\n')
    with pytest.raises(MopError, match="no benchmark JSON line with an mfu"):
        measured_mfu(out)


def test_one_gpu_peak_table_names_every_h100_variant():
    assert gpu_peak("NVIDIA H100 80GB HBM3") == gpu_peak("h100") == 989e12
    assert gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak("NVIDIA H100 NVL") == gpu_peak("NVIDIA H200 NVL") == 835e12
    assert gpu_peak("NVIDIA H200") == gpu_peak("NVIDIA GH200 480GB") == 989e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak("NVIDIA A10") == 125e12 and gpu_peak("NVIDIA L40S") == 362e12
    assert gpu_peak("a TPU") is None


def _family_configs():
    """config.json files as transformers' own config classes write them."""
    import transformers as t

    return {
        "bert": (
            t.BertConfig(
                num_hidden_layers=3,
                hidden_size=96,
                intermediate_size=200,
                num_attention_heads=4,
                vocab_size=1000,
            ),
            (3, 96, 200, 1000, None),
        ),
        "roberta": (
            t.RobertaConfig(
                num_hidden_layers=2,
                hidden_size=64,
                intermediate_size=100,
                num_attention_heads=4,
                vocab_size=500,
            ),
            (2, 64, 100, 500, None),
        ),
        "xlm-roberta": (
            t.XLMRobertaConfig(
                num_hidden_layers=4,
                hidden_size=32,
                intermediate_size=48,
                num_attention_heads=2,
                vocab_size=250002,
            ),
            (4, 32, 48, 250002, None),
        ),
        "electra": (
            t.ElectraConfig(
                num_hidden_layers=2,
                hidden_size=256,
                embedding_size=128,
                intermediate_size=1024,
                num_attention_heads=4,
                vocab_size=900,
            ),
            (2, 256, 1024, 900, 128),
        ),
        "deberta-v2": (
            t.DebertaV2Config(
                num_hidden_layers=5,
                hidden_size=48,
                intermediate_size=96,
                num_attention_heads=2,
                vocab_size=128100,
            ),
            (5, 48, 96, 128100, None),
        ),
        "distilbert": (
            t.DistilBertConfig(n_layers=3, dim=120, hidden_dim=480, n_heads=4, vocab_size=700),
            (3, 120, 480, 700, None),
        ),
        "albert": (
            t.AlbertConfig(
                num_hidden_layers=6,
                hidden_size=80,
                embedding_size=16,
                intermediate_size=160,
                num_attention_heads=4,
                vocab_size=300,
            ),
            (6, 80, 160, 300, 16),
        ),
    }


@pytest.mark.parametrize("family", sorted(_family_configs()))
def test_estimate_reads_every_encoder_family_from_its_config_json(family, tmp_path):
    config, (layers, hidden, intermediate, vocab, embedding) = _family_configs()[family]
    config.save_pretrained(tmp_path)
    shape = shape_from_config(tmp_path)
    assert (shape.layers, shape.hidden, shape.intermediate) == (layers, hidden, intermediate)
    assert (shape.vocab, shape.embedding) == (vocab, embedding)
    # what `mop plan --estimate` reads for a model given as a local folder
    assert model_shape("m", {"m": {"path": str(tmp_path)}}) == shape
    # the embedding projection (ELECTRA, ALBERT) is counted once per token
    flat = Shape(layers, hidden, intermediate)
    forward, flat_forward = (train_flops_per_token(s, 64)[1] for s in (shape, flat))
    assert forward - flat_forward == 2 * (embedding or 0) * hidden


def test_a_config_without_a_shape_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64}')
    with pytest.raises(MopError, match=r"config.json: no num_hidden_layers or n_layers .*gpt2"):
        shape_from_config(tmp_path)
