"""Opt-in dataset downloads: checked against their SHA-256 before anything is written
(file:// fixture URLs: no network in tests)."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from mop.cli import main
from mop.config import check_tasks
from mop.download import SOURCES, download, source
from mop.errors import MopError
from tests.conftest import REPO, snakemake, tiny_workdir

ORI = REPO / "tests" / "fixtures" / "tasks" / "pubmedqa" / "ori_pqal.json"
SHA = hashlib.sha256(ORI.read_bytes()).hexdigest()


def test_a_matching_file_lands_and_a_wrong_one_leaves_nothing(tmp_path):
    out = tmp_path / "data" / "ori_pqal.json"
    download(ORI.as_uri(), SHA, out)
    assert out.read_bytes() == ORI.read_bytes()
    bad = tmp_path / "bad" / "ori_pqal.json"
    with pytest.raises(MopError, match=f"expected {'0' * 64}; nothing written"):
        download(ORI.as_uri(), "0" * 64, bad)
    assert list(bad.parent.iterdir()) == []  # not even a temporary file
    with pytest.raises(MopError, match="download failed"):
        download((tmp_path / "absent.json").as_uri(), SHA, tmp_path / "x.json")


def test_the_command_line_names_the_mismatch(tmp_path, capsys):
    out = tmp_path / "ori_pqal.json"
    assert main(["download", "--url", ORI.as_uri(), "--sha256", "f" * 64, "--out", str(out)]) == 1
    assert "SHA-256 " + SHA in capsys.readouterr().err
    assert not out.exists()


def test_sources_and_config():
    src = source("pubmedqa", {"path": "x", "download": True})
    assert src == SOURCES["pubmedqa"] and "1cbae8e9" in src["url"]
    assert source("pubmedqa", {"url": "file:///a", "sha256": "AB" * 32})["sha256"] == "ab" * 32
    with pytest.raises(MopError, match=r"tasks\.medqa\.download: medqa has no stable public URL"):
        check_tasks(
            {
                "finetune": {"tasks": ["medqa"], "seeds": [0]},
                "tasks": {"medqa": {"path": "nowhere", "download": True}},
            }
        )
    # a download stands in for the missing file: no "not found" for it
    missing = check_tasks(
        {
            "finetune": {"tasks": ["pubmedqa"], "seeds": [0]},
            "tasks": {"pubmedqa": {"path": "nowhere", "download": True}},
        }
    )
    assert missing == []


@pytest.mark.slow
def test_the_workflow_downloads_before_the_task_reads_it(tmp_path):
    work = tiny_workdir(tmp_path / "w")
    data = tmp_path / "data" / "pubmedqa"
    extra = tmp_path / "download.yaml"
    task = {"path": str(data), "download": True, "url": ORI.as_uri(), "sha256": SHA}
    extra.write_text(
        yaml.safe_dump({"tasks": {"pubmedqa": task}, "finetune": {"tasks": ["probe", "pubmedqa"]}})
    )
    args = ("--configfile", str(work / "config" / "config.yaml"), str(extra))
    dry = snakemake(work, "-n", *args)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "rule download_pubmedqa:" in dry.stdout and "rule task_pubmedqa:" in dry.stdout
    target = str(data / "ori_pqal.json")
    result = snakemake(work, target, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (data / "ori_pqal.json").read_bytes() == ORI.read_bytes()
    (data / "ori_pqal.json").unlink()
    task["sha256"] = "0" * 64
    extra.write_text(
        yaml.safe_dump({"tasks": {"pubmedqa": task}, "finetune": {"tasks": ["probe", "pubmedqa"]}})
    )
    failed = snakemake(work, target, *args)
    assert failed.returncode != 0
    log = (work / "results" / "logs" / "downloads" / "pubmedqa.log").read_text()
    assert "expected " + "0" * 64 in log
    assert not (data / "ori_pqal.json").exists()
