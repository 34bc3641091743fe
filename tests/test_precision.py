"""bf16 on the CPU (`runtime.precision: bf16`): autocast over fp32 master weights, with the
losses, probe scores and mixture weights in fp32, as on CUDA."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from safetensors import safe_open

from mop.finetune import FinetuneConfig, finetune
from mop.pretrain import EntityPredictor, build_adapter_model, entity_loss
from mop.runtime import Runtime, bf16_supported, cpu_flags
from mop.tasks import get_task

TASK = get_task("probe")


def test_cpu_bf16_support_follows_the_cpu_flags():
    native = {"avx512_bf16", "amx_bf16"} & cpu_flags()
    assert bf16_supported(torch.device("cpu")) == bool(native)


def test_auto_is_bf16_exactly_on_cpus_with_native_bf16(monkeypatch):
    """The CPU flags decide `auto`, on whatever CPU the tests run: AMX or AVX-512 BF16
    gives bf16 autocast, anything else fp32; an explicit precision is kept as it is."""
    from mop import runtime

    for flags, expected in (
        ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),
        ({"avx512f", "avx512_bf16"}, "bf16"),
        ({"avx2", "avx512f", "fma"}, "fp32"),
        (set(), "fp32"),
    ):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        assert Runtime.create("cpu", "auto").precision == expected, flags
        assert Runtime.create("cpu", "fp32").precision == "fp32"
        assert Runtime.create("cpu", "bf16").precision == "bf16"


def _finetune(spec, adapters, probe, out, precision):
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=5e-4, seed=0, head="bilinear")
    rt = Runtime.create("cpu", precision, threads=1)
    return finetune(spec, TASK, probe, "mop", adapters, cfg, out, runtime=rt)


def test_bf16_finetuning_on_the_cpu_keeps_fp32_weights_and_is_close_to_fp32(
    tiny_spec, tiny_adapters, pair_probe_dir, tmp_path
):
    fp32 = _finetune(tiny_spec, tiny_adapters, pair_probe_dir, tmp_path / "fp32", "fp32")
    bf16 = _finetune(tiny_spec, tiny_adapters, pair_probe_dir, tmp_path / "bf16", "bf16")
    assert bf16["runtime"]["precision"] == "bf16" and bf16["runtime"]["device"] == "cpu"
    losses = {
        p: [h["train_loss"] for h in m["history"]] for p, m in (("fp32", fp32), ("bf16", bf16))
    }
    assert np.isfinite(losses["bf16"]).all()
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)
    # the saved (best) weights are the fp32 master weights, not bf16 copies
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F32"}
    # scores and mixture weights come out in fp32, a distribution per example
    preds = {p: pl.read_parquet(tmp_path / p / "predictions.parquet") for p in ("fp32", "bf16")}
    assert preds["bf16"].schema == preds["fp32"].schema
    mix = pl.read_parquet(tmp_path / "bf16" / "mixture.parquet")
    weights = np.asarray(mix["weights"].to_list())
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)


def test_bf16_pretraining_step_keeps_fp32_parameters_and_probe_scores(tiny_spec):
    torch.manual_seed(0)
    model = EntityPredictor(build_adapter_model(tiny_spec, "k", 8), 50)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1000, 2000, (4, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.tensor([0, 7, 21, 49])
    scores = {}
    for precision in ("fp32", "bf16"):
        model.load_state_dict(initial)
        rt = Runtime.create("cpu", precision, threads=1)
        model.eval()
        with torch.inference_mode():
            scores[precision] = model.scores(inputs, rt)
        model.train()
        opt = rt.optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}])
        loss = entity_loss(model, inputs, labels, rt)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        opt.step()
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    assert scores["bf16"].dtype == torch.float32
    # bf16 encoder, fp32 head: the ranking scores agree to bf16's precision
    torch.testing.assert_close(scores["bf16"], scores["fp32"], rtol=0.05, atol=0.05)
    assert not torch.equal(scores["bf16"], scores["fp32"])  # bf16 did run


def test_mixture_projections_are_one_matrix_product_per_layer(tiny_spec, tiny_adapters):
    """The fusion's query/key/value projections of the (batch, length, K, hidden) adapter
    stacks run as one product against the weight, never as a batch of per-token products
    against copies of it (what CPU bf16 made of strided stacks: 7 x slower evaluation)."""
    from mop.finetune import build_classifier

    cfg = FinetuneConfig(seed=0)
    model, fusion = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    hidden = model.encoder.config.hidden_size
    ids = torch.randint(1000, 2000, (8, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for precision in ("fp32", "bf16"):
        rt = Runtime.create("cpu", precision, threads=1)
        model.eval()
        profile = torch.profiler.profile(record_shapes=True)
        with profile as prof, torch.inference_mode(), rt.forward_context():
            logits, mix = model(**inputs, output_mixture=True)
        assert fusion in mix and torch.isfinite(logits).all()
        batched = [
            e.input_shapes
            for e in prof.events()
            if e.name == "aten::bmm" and e.input_shapes[1][-2:] == [hidden, hidden]
        ]
        assert batched == [], precision
