"""Growing a finished experiment costs only the new jobs (dry runs from the tiny workflow).

Each case extends the finished tiny workflow's config with `--configfile` (Snakemake merges
it into config/config.yaml) and asks Snakemake what it would run: the new jobs and the
tables that read them, nothing that exists. Tracking names, resources, threads and report
options schedule no training, partition or kg job.
"""

from __future__ import annotations

import collections
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, snakemake

pytestmark = pytest.mark.slow

TINY2 = {
    "random": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "seed": 1},
    "tokenizer": "minilm-l6",
}
HOC = str(REPO / "tests" / "fixtures" / "tasks" / "hoc")

# name -> (config extension, the jobs it schedules: rule -> count). Tables are the report
# rules (report_<name>) that read the new runs.
ANALYSIS = {
    "finetune_adapter": 2,
    "select_subsets": 1,
    "finetune_subset": 1,
    "report_single_adapters": 1,
    "report_subsets": 1,
    "report_figure2": 1,
}
CASES: dict[str, tuple[dict, dict[str, int]]] = {
    "seed": (
        {"finetune": {"seeds": [0, 1, 2]}},
        {"finetune_base": 1, "finetune_mop": 2, "report_table1": 1, "report_table6": 1},
    ),
    "task": (
        {"tasks": {"hoc": {"path": HOC}}, "finetune": {"tasks": ["probe", "hoc"]}},
        {
            "task_data": 1,
            "encode": 1,
            "finetune_base": 2,
            "finetune_mop": 4,
            "report_table1": 1,
            "report_table6": 1,
            **ANALYSIS,
        },
    ),
    "mixture": (
        {"finetune": {"mixtures": ["softmax", "gumbel-t0.5", "moe"]}},
        {"finetune_mop": 2, "report_table1": 1, "report_table6": 1},
    ),
    # a routed mixture: the task's links to the partitions, then its runs
    "routed mixture": (
        {"finetune": {"mixtures": ["softmax", "gumbel-t0.5", "softmax-routed"]}},
        {"link": 1, "finetune_mop": 2, "report_table1": 1, "report_table6": 1},
    ),
    "k": (
        {"partition": {"k": [2, 3]}},
        {"partition": 6, "report_table3": 1},
    ),
    # tiny2 shares minilm-l6's tokenizer: the task's tokens are reused
    "model": (
        {"models": {"tiny2": TINY2}, "base_models": ["tiny", "tiny2"]},
        {
            "tokenize": 1,
            "pretrain": 2,
            "finetune_base": 2,
            "finetune_mop": 4,
            "report_table1": 1,
            "report_table6": 1,
            **ANALYSIS,
        },
    ),
    "kg": (
        {
            "kgs": {
                "hpo-tiny2": {
                    "source": "hpo",
                    "diseases": 40,
                    "min_phenotypes": 8,
                    "max_phenotypes": 30,
                    "seed": 6,
                }
            }
        },
        {
            "kg": 1,
            "partition": 6,
            "tokenize": 1,
            "pretrain": 2,
            "finetune_mop": 4,
            "topics": 1,
            "report_table1": 1,
            "report_table2": 1,
            "report_table3": 1,
            "report_table6": 1,
            "report_wordclouds": 1,
            **ANALYSIS,
        },
    ),
    "shuffle rate": (
        {"partition": {"shuffle": [0.0, 0.1, 0.2, 0.3, 0.4, 0.8, 1.0]}},
        {"partition": 1, "report_table3": 1},
    ),
    "experiment": ({"experiment": "renamed"}, {}),
    "resources": ({"resources": {"finetune": {"mem_mb": 5000, "runtime": 30}}}, {}),
    "threads": ({"resources": {"finetune": {"threads": 2}, "pretrain": {"threads": 2}}}, {}),
    "runtime": ({"runtime": {"device": "cpu", "precision": "fp32"}}, {}),
    # analysis options: the topics job and the figures drawn from it, nothing else
    "report options": (
        {"analysis": {"topics": {"groups": 2, "terms": 12}}},
        {"topics": 1, "report_wordclouds": 1, "report_figure_topics": 1},
    ),
}
# Jobs every case may add besides its own: the MLflow report run and the target.
ALWAYS = {"publish", "all"}
TRAINING = {"kg", "partition", "tokenize", "pretrain", "encode", "task_probe", "task_data"}


def scheduled(work: Path, extension: dict, tmp_path: Path) -> collections.Counter:
    extra = tmp_path / "extension.yaml"
    extra.write_text(yaml.safe_dump(extension))
    result = snakemake(work, "-n", "--configfile", str(work / "config" / "config.yaml"), str(extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return collections.Counter(
        re.findall(r"^(?:rule|checkpoint) (\w+):", result.stdout, flags=re.M)
    )


@pytest.fixture(scope="module")
def finished(finished_run, tmp_path_factory) -> Path:
    """A copy of the finished tiny workflow (timestamps kept), so dry runs touch nothing
    other tests read."""
    work = tmp_path_factory.mktemp("grown") / "work"
    shutil.copytree(finished_run, work, symlinks=True)
    return work


@pytest.mark.parametrize("case", list(CASES))
def test_growing_the_config_schedules_only_the_new_jobs(case, finished, tmp_path):
    extension, allowed = CASES[case]
    jobs = scheduled(finished, extension, tmp_path)
    extra = {r: n for r, n in jobs.items() if r not in ALWAYS}
    assert extra == {r: n for r, n in allowed.items() if n}, f"{case}: {dict(jobs)}"
    if case in ("experiment", "resources", "threads", "runtime", "report options"):
        assert not (set(jobs) & (TRAINING | {"finetune_base", "finetune_mop"})), case
