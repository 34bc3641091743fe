"""The results grammar and the run grid, without Snakemake."""

import copy
import os

import pytest
import yaml

from mop.config import validate_config
from mop.errors import MopError
from mop.plan import LAYOUTS, Plan, Run, log_pattern, pattern, scheme_name
from tests.conftest import REPO

EXAMPLES = {
    "kg": {"kg": "hpo-demo"},
    "partition": {"kg": "sfull", "k": 20, "scheme": "shuffle0.2"},
    "tokens": {"kg": "sfull", "model": "pubmedbert"},
    "adapter": {"kg": "sfull", "k": 20, "scheme": "metis", "model": "scibert", "part": 7},
    "task": {"task": "medqa"},
    "encoded": {"task": "pubmedqa", "tokenizer": "biobert", "length": 512},
    "base": {"task": "hoc", "model": "biobert", "seed": 3},
    "single": {
        "task": "probe",
        "model": "m",
        "kg": "g",
        "k": 4,
        "scheme": "metis",
        "part": 2,
        "seed": 0,
    },
    "mop": {
        "task": "bioasq7b",
        "model": "m",
        "mixture": "gumbel-t0.5",
        "kg": "kg",
        "k": 20,
        "scheme": "metis",
        "seed": 9,
    },
    "subset": {
        "task": "probe",
        "model": "m",
        "mixture": "moe-k2-routed",
        "kg": "g",
        "k": 4,
        "scheme": "metis",
        "subset": "top2",
        "seed": 1,
    },
    "oracle": {"task": "probe", "model": "m", "kg": "g", "k": 4, "scheme": "metis", "seed": 0},
    "zeroshot": {"task": "probe", "model": "m", "kg": "g", "k": 4, "scheme": "metis", "seed": 0},
    "selection": {"task": "probe", "model": "m", "kg": "g", "k": 4, "scheme": "metis"},
    "links": {"task": "medqa", "kg": "g", "k": 4, "scheme": "shuffle0.2"},
    "download": {"task": "pubmedqa"},
    "topics": {"kg": "g", "k": 4, "scheme": "metis"},
}


def test_every_layout_has_an_example():
    assert set(EXAMPLES) == set(LAYOUTS)


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_folders_parse_back_to_their_run(kind):
    run = Run(kind, **EXAMPLES[kind])
    folder = run.folder("out/results")
    assert Run.parse(folder) == run
    assert Run.parse(f"{folder}/metrics.json") == run  # a file below it
    assert Run.parse(f"/abs/{folder}/adapter/adapter.safetensors") == run
    assert Run.root(folder) == "out/results"
    assert run.log("out/results") == f"out/results/logs/{folder.removeprefix('out/results/')}.log"
    assert pattern(kind, "", "r").count("{") == len(EXAMPLES[kind])
    assert log_pattern(kind, "r").startswith("r/logs/")


def test_a_kg_named_like_a_stage_is_still_a_kg():
    run = Run("partition", kg="kg", k=4, scheme="metis")
    assert run.folder() == "results/partition/kg/k4-metis"
    assert Run.parse(run.folder()) == run


def test_tags_and_names():
    run = Run("subset", **EXAMPLES["subset"])
    assert run.method == "mop" and run.stage == "finetune"
    assert run.tags() == {
        "stage": "finetune",
        "method": "mop",
        "task": "probe",
        "model": "m",
        "mixture": "moe-k2-routed",
        "kg": "g",
        "k": "4",
        "scheme": "metis",
        "subset": "top2",
        "seed": "1",
    }
    assert run.name() == "finetune probe m mop-moe-k2-routed g k4-metis subset-top2 seed1"
    adapter = Run("adapter", **EXAMPLES["adapter"])
    assert adapter.tags()["partition"] == "7" and adapter.name().startswith("pretrain sfull")


@pytest.mark.parametrize(
    "path",
    ["results/finetune/probe/m/mop-moe-x/g/k4-metis/seed0", "results/nothing/here", "x"],
)
def test_what_is_not_a_run_folder_is_an_error(path):
    with pytest.raises(MopError, match="not a folder of the results layout"):
        Run.parse(path)


def test_scheme_names_round_trip_through_the_grammar():
    for rate in (0.1, 0.2, 1.0):
        run = Run("partition", kg="g", k=2, scheme=scheme_name(rate))
        assert Run.parse(run.folder()).scheme == f"shuffle{rate!r}"


def _paper() -> Plan:
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    return Plan(validate_config(config))


def test_the_papers_grid_without_snakemake():
    plan = _paper()
    assert len(plan.base_runs()) == 3 * (5 + 10 + 10 + 10 + 3 + 3) == 123
    assert len(plan.mop_runs()) == 2 * 123
    assert len(plan.partitions()) == 2 * 6
    assert len(plan.adapter_runs()) == 2 * 3 * 20
    assert plan.task_folder("pubmedqa", 7) == "results/tasks/pubmedqa/fold7"
    assert plan.encoded_folder("pubmedqa", "biobert", 7) == (
        "results/encoded/pubmedqa/biobert/len512/fold7"
    )


def test_each_fine_tuning_run_gets_only_the_keys_it_reads():
    plan = _paper()
    base = plan.finetune_options(Run("base", task="hoc", model="scibert", seed=0))
    mop = plan.finetune_options(plan.mop_runs()[0])
    assert base["lr"] == 2e-5 and base["batch_size"] == 32  # the task's own settings
    for grid_key in ("seeds", "tasks", "methods", "kgs", "mixtures", "k"):
        assert grid_key not in base and grid_key not in mop
    assert "lr_fusion" not in base and "lr_adapters" not in base and "gumbel_tau" not in base
    assert {"lr_fusion", "lr_adapters", "fusion_reg"} <= set(mop)
    # a mixture reads its own settings only: softmax no Gumbel or MoE keys
    assert not {"gumbel_tau", "moe_top_k", "moe_importance", "route_loss"} & set(mop)
    # the model entries of one job, not the whole models section
    assert set(plan.model_entries("scibert")) == {"scibert"}


def test_mixture_names_say_which_settings_a_run_reads():
    from mop.fusion import parse_mixture
    from mop.plan import mixture_keys

    assert mixture_keys("softmax") == ["fusion_reg"]
    assert mixture_keys("gumbel-t0.5") == ["fusion_reg", "gumbel_tau"]
    assert mixture_keys("moe-k3-routed-prior") == [
        "fusion_reg",
        "moe_top_k",
        "moe_importance",
        "moe_load",
        "route_loss",
        "route_prior",
    ]
    run = Run.parse("results/finetune/probe/m/mop-gumbel-t0.5-routed/kg/k4-metis/seed0")
    assert run.mixture == "gumbel-t0.5-routed"
    m = parse_mixture(run.mixture)
    assert (m.kind, m.tau, m.routed, m.prior) == ("gumbel", 0.5, True, False)
    m = parse_mixture("moe-k3-routed-prior")
    assert (m.kind, m.top_k, m.routed, m.prior, m.needs_links) == ("moe", 3, True, True, True)
    assert not parse_mixture("softmax").needs_links
    # -routed-w<weight>: the run's own routing loss weight, so it does not read route_loss
    from mop.plan import routed

    m = parse_mixture("moe-k1-routed-w6")
    assert (m.top_k, m.routed, m.route_loss) == (1, True, 6.0)
    assert mixture_keys("softmax-routed-w0.5-prior") == ["fusion_reg", "route_prior"]
    assert routed("softmax-routed-w6") and routed("softmax-routed-w6-prior")
    assert Run.parse("results/finetune/probe/m/mop-softmax-routed-w6/kg/k4-metis/seed0").mixture
    for bad in (
        "softmax-prior-routed",
        "routed",
        "softmax-route",
        "softmax-w6",
        "softmax-routed-w",
    ):
        with pytest.raises(MopError):
            parse_mixture(bad)
        with pytest.raises(MopError):
            mixture_keys(bad)


def test_options_do_not_move_when_the_grid_grows():
    plan = _paper()
    run = Run("base", task="hoc", model="scibert", seed=0)
    before = plan.finetune_options(run)
    grown = copy.deepcopy(plan.config)
    grown["finetune"]["seeds"] = [0, 1, 2, 3]
    grown["finetune"]["mixtures"] = ["softmax", "gumbel"]
    grown["tasks"]["hoc"]["finetune"]["seeds"] = [0, 1, 2, 3, 4, 5]
    grown["base_models"].append("extra")
    grown["models"]["extra"] = {"hub": "x/y", "download": True, "trust_remote_code": False}
    grown["experiment"] = "other"
    grown["resources"] = {"finetune": {"threads": 4, "gpus": 2}}
    after = Plan(grown)
    assert after.finetune_options(run) == before
    assert after.pretrain_options() == plan.pretrain_options()
    assert after.partition_options() == plan.partition_options()
    assert after.model_entries("scibert") == plan.model_entries("scibert")


def test_gpus_go_to_training_stages_only():
    plan = _paper()
    assert plan.resources("finetune")["gpu"] == 1 and plan.resources("pretrain")["gpu"] == 1
    for stage in ("kg", "partition", "tokenize", "report"):
        assert "gpu" not in plan.resources(stage)
    config = copy.deepcopy(plan.config)
    config["resources"]["finetune"] |= {"gpu_model": "a100", "cpus_per_gpu": 4}
    config["resources"]["default"] = {"slurm_partition": "cpu"}
    res = Plan(config).resources("finetune")
    assert res["gpu_model"] == "a100" and res["cpus_per_gpu"] == 4
    assert res["slurm_partition"] == "cpu" and res["mem_mb"] == 32000


def test_jobs_find_the_mop_command_beside_the_python_running_snakemake(tmp_path):
    """Started as `.venv/bin/snakemake` without an activated venv, the jobs still run the
    venv's `mop`; the runtime and experiment travel in the environment, not as params."""
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    config.update(experiment="grid-a", runtime={"device": "cuda:1", "compile": True})
    plan = Plan(validate_config(config))
    venv_bin, python = tmp_path / "venv" / "bin", str(tmp_path / "venv" / "bin" / "python")
    system = os.pathsep.join([str(tmp_path / "usr" / "bin"), str(tmp_path / "bin")])
    env = plan.job_environment({"PATH": system}, python)
    assert env["PATH"] == os.pathsep.join([str(venv_bin), system])
    # A nested Snakemake (a SLURM job) does not stack the folder again.
    assert plan.job_environment(env, python)["PATH"] == env["PATH"]
    assert plan.job_environment({}, python)["PATH"] == str(venv_bin)
    assert (env["MOP_EXPERIMENT"], env["MOP_DEVICE"], env["MOP_COMPILE"]) == (
        "grid-a",
        "cuda:1",
        "1",
    )
