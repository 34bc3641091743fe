"""The bad-input matrix: each case ends in one clear message naming the file, line or key,
a non-zero exit status, and no partial output."""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from mop.plan import Run
from tests.conftest import MODELS, REPO, corrupt_checkpoint

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def mop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mop.cli", *args], capture_output=True, text=True)


def _config(tmp_path: Path, edit) -> list[str]:
    config = json.loads(json.dumps(DEFAULT))
    config["results"] = str(tmp_path / "results")
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["check-config", str(path)]


CONFIG_CASES = {
    "wrong type": (
        lambda c: c["partition"].update(k=["4"]),
        r"config key partition\.k\[0\]: '4' is not of type 'integer'",
    ),
    "unknown key": (
        lambda c: c["pretrain"].update(learning_rate=1),
        r"config key pretrain: Additional properties are not allowed \('learning_rate'",
    ),
    "name escaping results/": (
        lambda c: c["kgs"].update({"../../etc": c["kgs"]["hpo-demo"]}),
        r"config key kgs: '\.\./\.\./etc' does not match",
    ),
    "experiment with a slash": (
        lambda c: c.update(experiment="a/b"),
        r"config key experiment: 'a/b' does not match",
    ),
    "unknown model alias": (
        lambda c: c.update(base_models=["pubmedbert"]),
        r"config key base_models: unknown model alias 'pubmedbert'",
    ),
    "hub model offline": (
        lambda c: (
            c["models"].update(sci={"hub": "allenai/scibert"}),
            c.update(base_models=["sci"]),
        ),
        r"config key models\.sci\.hub: 'allenai/scibert' is not in the local",
    ),
    "K larger than the entities": (
        lambda c: (c["partition"].update(k=[99999]), c["finetune"].update(k=99999)),
        r"config key partition\.k: K = 99999 is larger than the 2763",
    ),
    "finetune K not partitioned": (
        lambda c: c["finetune"].update(k=7),
        r"config key finetune\.k: 7 is not one of partition\.k \[4\]",
    ),
    "probe on an unknown KG": (
        lambda c: c["tasks"]["probe"].update(kg="snomed"),
        r"config key tasks\.probe\.kg: unknown KG 'snomed'",
    ),
    "bad mixture name": (
        lambda c: c["finetune"].update(mixtures=["moe-x"]),
        r"config key finetune\.mixtures\[0\]: 'moe-x' does not match",
    ),
    "too many diseases": (
        lambda c: c["kgs"]["hpo-demo"].update(diseases=999999),
        r"kgs\.\*\.diseases: 999999 diseases asked for",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(case, tmp_path):
    edit, message = CONFIG_CASES[case]
    result = mop(*_config(tmp_path, edit))
    assert result.returncode == 1
    lines = [x for x in result.stderr.splitlines() if "error" in x]
    assert len(lines) == 1 and lines[0].startswith("mop: error: "), result.stderr
    assert pytest.importorskip("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "results").exists()


def test_unparsable_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("partition: {k: [4\n")
    result = mop("check-config", str(path))
    assert result.returncode == 1 and f"{path}: cannot read config" in result.stderr


def _one_line_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def _where(tmp_path: Path, kind: str, **fields) -> Path:
    """A run folder of the results layout (a command reads its identity from it)."""
    return tmp_path / Run(kind, **fields).folder("results")


def test_missing_kg_folder(tmp_path):
    out = _where(tmp_path, "partition", kg="g", k=2, scheme="metis")
    result = mop("partition", "--kg", str(tmp_path / "nope"), "--out", str(out))
    _one_line_error(result, str(tmp_path / "nope"), "file not found")
    assert not out.exists()


def test_k_larger_than_a_built_kg(small_kg, tmp_path):
    out = _where(tmp_path, "partition", kg="g", k=100000, scheme="metis")
    result = mop("partition", "--kg", str(small_kg), "--out", str(out))
    _one_line_error(result, "K = 100000 is not between 1 and the number of entities")
    assert not out.exists()


def test_corrupt_tokens_table(small_kg, small_partition, tmp_path):
    tokens = tmp_path / "tokens.parquet"
    tokens.write_bytes(b"PAR1 this is not parquet")
    out = _where(tmp_path, "adapter", kg="g", k=3, scheme="metis", model="tiny", part=0)
    result = mop(
        "pretrain",
        "--kg",
        str(small_kg),
        "--tokens",
        str(tokens),
        "--partition",
        str(small_partition),
        "--models",
        json.dumps(MODELS),
        "--out",
        str(out),
    )
    _one_line_error(result, str(tokens))
    assert not (out / "adapter").exists()


def test_membership_without_its_columns(small_kg, small_tokens, tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    pl.DataFrame({"entity": [0, 1]}).write_parquet(part / "membership.parquet")
    result = mop(
        "pretrain",
        "--kg",
        str(small_kg),
        "--tokens",
        str(small_tokens),
        "--partition",
        str(part),
        "--models",
        json.dumps(MODELS),
        "--out",
        str(_where(tmp_path, "adapter", kg="g", k=3, scheme="metis", model="tiny", part=0)),
    )
    _one_line_error(result, "membership.parquet", "partition")


def test_unknown_probe_relation(small_kg, small_partition, tmp_path):
    out = _where(tmp_path, "task", task="probe")
    result = mop(
        "task",
        "--kg",
        str(small_kg),
        "--partition",
        str(small_partition),
        "--options",
        json.dumps({"relation": "treats"}),
        "--out",
        str(out),
    )
    _one_line_error(result, "tasks.probe.relation: 'treats' is not a relation of")
    assert not out.exists()


def _task_dir(tmp_path: Path, labels: list[int]) -> Path:
    d = tmp_path / "task"
    d.mkdir()
    for split in ("train", "dev", "test"):
        pl.DataFrame(
            {
                "id": [f"{split}{i}" for i in range(len(labels))],
                "text_a": ["Is fever a feature of flu?"] * len(labels),
                "text_b": [None] * len(labels),
                "label": labels,
            },
            schema_overrides={"text_b": pl.String},
        ).write_parquet(d / f"{split}.parquet")
    return d


def _finetune(task_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return mop(
        "finetune",
        "--task-dir",
        str(task_dir),
        "--models",
        json.dumps(MODELS),
        "--out",
        str(out),
        *extra,
    )


def test_label_outside_the_label_set(tmp_path):
    task = _task_dir(tmp_path, [0, 1, 7, 0])
    out = _where(tmp_path, "base", task="probe", model="tiny", seed=0)
    _one_line_error(
        _finetune(task, out), str(task / "train.parquet"), "row 2 has label 7 outside 0..1"
    )
    assert not out.exists()


def test_missing_task_split(tmp_path):
    task = _task_dir(tmp_path, [0, 1])
    (task / "dev.parquet").unlink()
    out = _where(tmp_path, "base", task="probe", model="tiny", seed=0)
    _one_line_error(_finetune(task, out), str(task / "dev.parquet"), "task split not found")
    assert not out.exists()


def test_a_folder_outside_the_results_layout(tmp_path):
    """A run's identity comes from its folder: one that names no run (here an unknown
    mixture, `mop-moe-x`) is refused before anything is written."""
    task = _task_dir(tmp_path, [0, 1])
    out = tmp_path / "results/finetune/probe/tiny/mop-moe-x/g/k2-metis/seed0"
    result = mop(
        "finetune",
        "--task-dir",
        str(task),
        "--adapters",
        "a",
        "--models",
        json.dumps(MODELS),
        "--out",
        str(out),
    )
    _one_line_error(result, str(out), "not a folder of the results layout")
    assert not out.exists()


def test_options_that_are_not_json(tmp_path):
    result = mop(
        "partition",
        "--kg",
        str(tmp_path),
        "--options",
        "{k: 2",
        "--out",
        str(tmp_path / "p"),
    )
    assert result.returncode == 2
    assert "argument --options: not valid JSON" in result.stderr


def test_unreadable_checkpoint(small_kg, small_partition, small_tokens, tmp_path):
    out = _where(tmp_path, "adapter", kg="g", k=3, scheme="metis", model="tiny", part=0)
    corrupt_checkpoint(out / "checkpoint")
    result = mop(
        "pretrain",
        "--kg",
        str(small_kg),
        "--tokens",
        str(small_tokens),
        "--partition",
        str(small_partition),
        "--models",
        json.dumps(MODELS),
        "--out",
        str(out),
    )
    _one_line_error(result, str(out / "checkpoint"), "checkpoint is unreadable")
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
