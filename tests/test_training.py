"""The shared training runtime: devices, precision, parameter groups, accumulation,
checkpoints and the SIGTERM stop, on the CPU with an explicit device (and on CUDA where
present: tests marked `cuda`)."""

import os
import signal
import time

import numpy as np
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from mop.checkpoint import Checkpoint, StopSignal
from mop.errors import MopError
from mop.finetune import FinetuneConfig, build_classifier, classifier_groups, task_loss
from mop.runtime import Runtime, resolve_device
from mop.tasks import get_task
from mop.training import accumulate, micro_batches, optimizer_step, param_groups, share

TASK = get_task("probe")


def test_device_names_resolve_or_fail_with_the_key():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MopError, match=r"runtime\.device: 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MopError, match="sees no CUDA device"):
            resolve_device("cuda:0")


def test_precision_fp32_and_bf16_autocast_on_the_cpu():
    rt = Runtime.create("cpu", "fp32", threads=1)
    assert rt.precision == "fp32" and not rt.cuda
    with rt.forward_context():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    rt = Runtime.create("cpu", "bf16", threads=1)
    with rt.forward_context():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert rt.describe()["precision"] == "bf16" and rt.peak_memory_mb() is None
    with pytest.raises(MopError, match=r"runtime\.precision"):
        Runtime.create("cpu", "fp8")


def test_parameter_groups_exempt_bias_and_layer_norm_from_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    model.register_module("LayerNorm", torch.nn.LayerNorm(3))
    groups = {g["name"]: g for g in param_groups(model, 0.01, {"all": 1e-3})}
    decayed = {id(p) for p in groups["all"]["params"]}
    assert decayed == {id(model[0].weight), id(model[1].weight)}
    assert groups["all_no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["all_no_decay"]["params"]} == {
        id(model[0].bias),
        id(model[1].bias),
        id(model.LayerNorm.weight),
        id(model.LayerNorm.bias),
    }


def test_micro_batches_cover_the_batch_in_order():
    idx = np.arange(10) * 3
    parts = micro_batches(idx, 4)
    assert [p.size for p in parts] == [3, 3, 2, 2]
    assert np.concatenate(parts).tolist() == idx.tolist()
    assert len(micro_batches(idx[:2], 4)) == 2


@pytest.fixture(scope="module")
def probe_batch(tiny_spec, small_kg, small_partition, tmp_path_factory):
    from mop.models import load_tokenizer
    from mop.tasks.encode import load_split
    from mop.tasks.probe import prepare

    out = tmp_path_factory.mktemp("probe_accum")
    prepare(small_kg, small_partition, out, max_questions={"train": 32, "dev": 8, "test": 8})
    return load_split(out, "train", "single", tokenizer=load_tokenizer(tiny_spec), max_length=64)


def _grads_after(model, split, grad_accum: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.eval()  # no dropout: both sides see the same function

    def loss_of(micro, whole):
        batch = split.seqs.batch(split.rows(micro), 0)
        logits, _ = model(**batch)
        return task_loss(TASK, logits, torch.from_numpy(split.labels[micro])) * share(micro, whole)

    loss = accumulate(np.arange(16), grad_accum, loss_of)
    assert loss.ndim == 0 and torch.isfinite(loss)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_one_large_batch(tiny_spec, tiny_adapters, probe_batch):
    """Four micro-batches of 4 give the gradient (and the step) of one batch of 16."""
    cfg = FinetuneConfig(lr=1e-3)
    model, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
    whole = _grads_after(model, probe_batch, 1)
    parts = _grads_after(model, probe_batch, 4)
    assert whole.keys() == parts.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-6)
    # and the same optimizer step
    states = []
    for accum in (1, 4):
        torch.manual_seed(0)
        m, _ = build_classifier(tiny_spec, TASK, "mop", tiny_adapters, cfg)
        opt = torch.optim.AdamW(classifier_groups(m, cfg))
        sched = get_linear_schedule_with_warmup(opt, 0, 10)
        _grads_after(m, probe_batch, accum)
        optimizer_step(m, opt, sched, max_grad_norm=1.0)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6)


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = get_linear_schedule_with_warmup(opt, 0, 100)
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        optimizer_step(model, opt, sched)


def test_checkpoint_restores_weights_optimizer_schedule_and_rng(tmp_path):
    model, opt, sched = _toy()
    _train(model, opt, sched, 3)
    ckpt = Checkpoint(tmp_path / "ckpt", "abc")
    ckpt.save(model, opt, sched, {"step": 3, "epoch": 0, "history": [[1, 0.5]]})
    expected_next = torch.rand(3)
    _train(model, opt, sched, 2)
    after = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fopt, fsched = _toy()
    resumed = Checkpoint(tmp_path / "ckpt", "abc").load(fresh, fopt, fsched)
    assert resumed is not None and resumed.position["step"] == 3
    assert resumed.position["history"] == [[1, 0.5]] and resumed.kept is None
    assert torch.equal(torch.rand(3), expected_next)  # the CPU RNG came back too
    assert fsched.last_epoch == 3
    torch.manual_seed(1)
    _train(fresh, fopt, fsched, 2)
    torch.manual_seed(1)
    model2, opt2, sched2 = _toy()
    Checkpoint(tmp_path / "ckpt", "abc").load(model2, opt2, sched2)
    torch.manual_seed(1)
    _train(model2, opt2, sched2, 2)
    for k in after:
        assert torch.equal(fresh.state_dict()[k], model2.state_dict()[k])
    # Other data or settings: the checkpoint is not used.
    assert Checkpoint(tmp_path / "ckpt", "other").load(*_toy()) is None


def test_checkpoint_keeps_one_complete_folder_and_links_an_unchanged_kept_state(tmp_path):
    model, opt, sched = _toy()
    ckpt = Checkpoint(tmp_path / "ckpt", "fp")
    kept_calls = []

    def kept():
        kept_calls.append(1)
        return {"w": model.weight.detach().clone()}

    ckpt.save(model, opt, sched, {"step": 1}, kept=kept, kept_tag=0)
    first = (tmp_path / "ckpt" / "step-00000001" / "kept.safetensors").stat().st_ino
    ckpt.save(model, opt, sched, {"step": 2}, kept=kept, kept_tag=0)
    linked = (tmp_path / "ckpt" / "step-00000002" / "kept.safetensors").stat().st_ino
    assert linked == first and len(kept_calls) == 1
    ckpt.save(model, opt, sched, {"step": 3}, kept=kept, kept_tag=1)
    assert len(kept_calls) == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "latest.json",
        "step-00000003",
    ]
    # A half-written folder from a killed save is ignored: latest.json names a complete one.
    (tmp_path / "ckpt" / ".step-00000004.tmp").mkdir()
    resumed = Checkpoint(tmp_path / "ckpt", "fp").load(*_toy())
    assert resumed.position["step"] == 3 and set(resumed.kept) == {"w"}


def test_unreadable_checkpoint_names_its_folder(tmp_path):
    from tests.conftest import corrupt_checkpoint

    corrupt_checkpoint(tmp_path / "ckpt")
    with pytest.raises(MopError, match=r"ckpt/step-00000010: checkpoint is unreadable"):
        Checkpoint(tmp_path / "ckpt", "fp").load(*_toy())


def test_sigterm_only_asks_the_loop_to_stop():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == before


def test_freed_memory_is_kept_where_glibc_allows_it():
    import platform

    from mop.runtime import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    assert keep_freed_memory() is True


def _loop(folder, **hooks):
    """A toy regression trained by `Loop`: 10 examples, batches of 3 (4 per epoch)."""
    from mop.training import Loop

    model, opt, sched = _toy()
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(10, 2)

    def loss_of(micro, batch):
        return ((model(x[micro]) - y[micro]) ** 2).mean() * share(micro, batch)

    lengths = np.arange(10) % 3 + 1
    return Loop(
        "toy",
        model,
        opt,
        sched,
        Checkpoint(folder, "fp"),
        loss_of,
        lengths,
        3,
        0,
        epochs=3,
        total_steps=12,
        checkpoint_every=2,
        **hooks,
    )


def test_the_loop_resumes_where_it_stopped_and_hooks_stop_it(tmp_path):
    from mop.errors import Preempted
    from mop.training import LoopState

    whole = _loop(tmp_path / "a")
    done = whole.run(LoopState())
    assert (done.step, done.epoch, done.batch, done.examples) == (12, 3, 0, 30)

    class Stop(Exception):
        pass

    def killed(state, loss):  # dies after the checkpoint of step 6, before it is saved again
        if state.step == 7:
            raise Stop

    with pytest.raises(Stop):
        _loop(tmp_path / "b", after_step=killed).run(LoopState())
    again = _loop(tmp_path / "b")
    state, _ = again.resume(LoopState())
    assert (state.step, state.epoch, state.batch) == (6, 1, 2)
    assert again.run(state).step == 12
    for p, q in zip(whole.model.parameters(), again.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    losses = []

    def after_epoch(state, train_loss):
        losses.append(train_loss)
        return len(losses) == 2  # early stopping after the second epoch

    stopped = _loop(tmp_path / "c", after_epoch=after_epoch).run(LoopState())
    assert (stopped.step, stopped.epoch, stopped.finished) == (8, 2, True)
    assert losses[1] < losses[0]
    resumed, _ = _loop(tmp_path / "c").resume(LoopState())
    assert resumed.finished and resumed.step == 8  # a finished run does not train again

    def sigterm(state, loss):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="toy: stopped by SIGTERM at step 3"):
        _loop(tmp_path / "d", after_step=sigterm).run(LoopState())
    assert _loop(tmp_path / "d").resume(LoopState())[0].step == 3
