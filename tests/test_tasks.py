"""The paper's task loaders on hand-made, format-exact fixtures, and their metrics by hand."""

import copy
import json
import shutil

import numpy as np
import polars as pl
import pytest
import yaml

from mop.config import check_tasks, validate_config
from mop.errors import MopError
from mop.plan import Plan
from mop.tasks import (
    accuracy_and_macro_f1,
    document_micro_f1,
    get_task,
    prepare_data,
)
from mop.tasks.pubmedqa import make_official_split, read_questions, write_official_split
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "tasks"


def test_hoc_rows_labels_and_documents(tmp_path):
    summary = prepare_data("hoc", {"path": str(FIXTURES / "hoc")}, tmp_path)
    train = pl.read_parquet(tmp_path / "train.parquet")
    lines = (FIXTURES / "hoc" / "train.tsv").read_text().splitlines()
    assert train.height == len(lines) - 1 == summary["examples"]["train"]
    first = lines[1].split("\t")
    row = train.row(0, named=True)
    assert row["id"] == first[2] and row["text_a"] == first[1] and row["text_b"] is None
    assert row["document"] == first[2].split("_s")[0]
    expected = [int(item.split("_")[1]) for item in first[0].split(",")]
    assert row["label"] == expected and len(expected) == 10
    assert summary["documents"]["train"] == train["document"].n_unique()
    # per-label counts add up to the 1s in the file
    ones = sum(item.endswith("_1") for line in lines[1:] for item in line.split("\t")[0].split(","))
    assert sum(summary["labels"]["train"].values()) == ones


def test_bioasq_rows(tmp_path):
    prepare_data("bioasq8b", {"path": str(FIXTURES / "bioasq7b")}, tmp_path)
    dev = pl.read_parquet(tmp_path / "dev.parquet")
    fields = (FIXTURES / "bioasq7b" / "dev.tsv").read_text().splitlines()[1].split("\t")
    assert dev.row(1) == (fields[0], fields[1], fields[2], ("no", "yes").index(fields[3]))
    assert json.loads((tmp_path / "summary.json").read_text())["task"] == "bioasq8b"


def test_mednli_rows(tmp_path):
    prepare_data("mednli", {"path": str(FIXTURES / "mednli")}, tmp_path)
    test = pl.read_parquet(tmp_path / "test.parquet")
    raw = [json.loads(x) for x in (FIXTURES / "mednli" / "mli_test_v1.jsonl").open()]
    assert test["id"].to_list() == [r["pairID"] for r in raw]
    assert test["text_a"].to_list() == [r["sentence1"] for r in raw]
    assert test["text_b"].to_list() == [r["sentence2"] for r in raw]
    labels = ["entailment", "neutral", "contradiction"]
    assert test["label"].to_list() == [labels.index(r["gold_label"]) for r in raw]


def test_medqa_rows_and_retrieved_contexts(tmp_path):
    options = {
        "path": str(FIXTURES / "medqa" / "questions" / "US"),
        "corpus": str(FIXTURES / "medqa" / "textbooks" / "en"),
        "top_k": 2,
    }
    summary = prepare_data("medqa", options, tmp_path)
    assert summary["options"] == 5 and summary["sentences"] == 9
    test = pl.read_parquet(tmp_path / "test.parquet")
    first = json.loads((FIXTURES / "medqa" / "questions" / "US" / "test.jsonl").open().readline())
    row = test.row(0, named=True)
    assert row["text_a"] == first["question"]
    assert row["choices"] == [first["options"][k] for k in "ABCDE"]
    assert row["label"] == "ABCDE".index(first["answer_idx"])
    # insulin question: the insulin sentences of the corpus rank first for the right option
    insulin = row["contexts"][row["label"]]
    assert insulin.startswith("Lack of insulin causes hyperglycemia and polyuria.")
    assert all(len(c) > 0 for c in row["contexts"])
    gout = test.row(2, named=True)
    assert "monosodium urate" in gout["contexts"][4]


def test_medqa_without_corpus_has_no_contexts(tmp_path):
    prepare_data("medqa", {"path": str(FIXTURES / "medqa" / "questions" / "US")}, tmp_path)
    assert "contexts" not in pl.read_parquet(tmp_path / "dev.parquet").columns


def test_pubmedqa_split_is_the_official_one():
    """The official script's output on the fixture (PMIDs in file order) is reproduced."""
    official = json.loads((FIXTURES / "pubmedqa" / "official_split_pmids.json").read_text())
    test, cv = make_official_split(read_questions(FIXTURES / "pubmedqa" / "ori_pqal.json"))
    assert list(test) == official["test"]
    assert [list(dev) for _, dev in cv] == official["dev"]
    assert [list(train) for train, _ in cv] == official["train"]


def test_pubmedqa_split_is_label_stratified_and_disjoint():
    questions = read_questions(FIXTURES / "pubmedqa" / "ori_pqal.json")
    test, cv = make_official_split(questions)
    assert len(test) == 50
    share = {
        lab: sum(q["final_decision"] == lab for q in questions.values()) / 100
        for lab in ("yes", "no", "maybe")
    }
    for lab, p in share.items():
        assert abs(sum(q["final_decision"] == lab for q in test.values()) / 50 - p) < 0.03
    for train, dev in cv:
        assert len(train) + len(dev) == 50
        assert not set(train) & set(dev) and not (set(train) | set(dev)) & set(test)


def test_pubmedqa_folds_from_split_files_equal_those_from_ori_pqal(tmp_path):
    write_official_split(FIXTURES / "pubmedqa" / "ori_pqal.json", tmp_path / "data")
    official = json.loads((tmp_path / "data" / "pqal_fold3" / "dev_set.json").read_text())
    assert (
        list(official)
        == json.loads((FIXTURES / "pubmedqa" / "official_split_pmids.json").read_text())["dev"][3]
    )
    a = prepare_data("pubmedqa", {"path": str(tmp_path / "data")}, tmp_path / "a")
    b = prepare_data("pubmedqa", {"path": str(FIXTURES / "pubmedqa")}, tmp_path / "b")
    assert "split files" in a["source"] and "recipe" in b["source"]
    for i in range(10):
        for s in ("train", "dev", "test"):
            fa = pl.read_parquet(tmp_path / "a" / f"fold{i}" / f"{s}.parquet")
            assert fa.equals(pl.read_parquet(tmp_path / "b" / f"fold{i}" / f"{s}.parquet"))
    dev = pl.read_parquet(tmp_path / "a" / "fold3" / "dev.parquet")
    first = next(iter(official.values()))
    assert dev["text_a"][0] == first["QUESTION"]
    assert dev["text_b"][0] == " ".join(first["CONTEXTS"])
    assert dev["label"][0] == ("yes", "no", "maybe").index(first["final_decision"])


def test_document_micro_f1_by_hand():
    # doc A: gold OR = [1,0,0], pred OR = [1,1,0]; doc B: gold [0,1,1], pred [0,1,0]
    # documents: TP 2, FP 1, FN 1 -> 4/6; sentences: TP 1, FP 2, FN 2 -> 2/6
    frame = pl.DataFrame(
        {
            "document": ["A", "A", "B", "B"],
            "label": [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]],
            "pred": [[0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]],
        }
    )
    m = document_micro_f1(frame)
    assert m["micro_f1"] == pytest.approx(4 / 6)
    assert m["sentence_micro_f1"] == pytest.approx(2 / 6)


def test_accuracy_and_macro_f1_by_hand():
    # class 0: TP 2 FP 1 FN 1 -> 2/3; class 1: TP 1 FP 1 FN 1 -> 1/2; class 2: 1
    frame = pl.DataFrame({"label": [0, 0, 1, 2, 1, 0], "pred": [0, 1, 1, 2, 0, 0]})
    m = accuracy_and_macro_f1(frame)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_multi_label_evaluation_thresholds_at_one_half():
    from mop.finetune import evaluate
    from mop.tasks.encode import EncodedSplit

    frame = pl.DataFrame({"id": ["d1_s0", "d1_s1"], "text_a": ["x", "y"], "document": ["d1"] * 2})
    split = EncodedSplit(["d1_s0", "d1_s1"], None, np.array([[1, 0], [0, 0]]), frame)
    spec = get_task("hoc")
    probs = np.array([[0.7, 0.2], [0.4, 0.5]], dtype=np.float32)
    metrics, out = evaluate(spec, split, probs)
    assert out["pred"].to_list() == [[1, 0], [0, 1]]
    # document d1: gold [1,0], pred [1,1] -> TP 1, FP 1 -> 2/3
    assert metrics["micro_f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("task", "folder", "edit", "message"),
    [
        ("hoc", "hoc", lambda t: t.replace("labels\t", "label\t", 1), r"train.tsv:1: header"),
        ("hoc", "hoc", lambda t: t.replace("0_0,", "0_2,", 1), r"train.tsv:2: bad label '0_2'"),
        ("hoc", "hoc", lambda t: t.replace("_s1\n", "\textra\n", 1), r"train.tsv:\d+: 4 tab"),
        ("bioasq7b", "bioasq7b", lambda t: t.replace("\tyes", "\tmaybe", 1), r"label 'maybe'"),
        ("bioasq7b", "bioasq7b", lambda t: "x\ty\n" + t, r"train.tsv:1: 2 tab-separated"),
        (
            "mednli",
            "mednli",
            lambda t: t.replace("entailment", "entails", 1),
            r"_v1.jsonl:1: label",
        ),
        ("mednli", "mednli", lambda t: t + "{broken\n", r"mli_train_v1.jsonl:7: not valid JSON"),
    ],
)
def test_bad_files_name_file_and_line(task, folder, edit, message, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / folder, data)
    name = "mli_train_v1.jsonl" if task == "mednli" else "train.tsv"
    (data / name).write_text(edit((data / name).read_text()))
    with pytest.raises(MopError, match=message):
        prepare_data(task, {"path": str(data)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_medqa_and_pubmedqa_files(tmp_path):
    data = tmp_path / "medqa"
    shutil.copytree(FIXTURES / "medqa" / "questions" / "US", data)
    text = (data / "dev.jsonl").read_text().replace('"answer_idx": "B"', '"answer_idx": "F"')
    (data / "dev.jsonl").write_text(text)
    with pytest.raises(MopError, match=r"dev.jsonl:2: answer_idx 'F' is not one of the options"):
        prepare_data("medqa", {"path": str(data)}, tmp_path / "out")
    pqa = tmp_path / "pqa"
    pqa.mkdir()
    raw = json.loads((FIXTURES / "pubmedqa" / "ori_pqal.json").read_text())
    pmid = next(iter(raw))
    raw[pmid]["final_decision"] = "perhaps"
    (pqa / "ori_pqal.json").write_text(json.dumps(raw, indent=4))
    with pytest.raises(MopError, match=rf"PMID {pmid} has final_decision 'perhaps'"):
        prepare_data("pubmedqa", {"path": str(pqa)}, tmp_path / "out")


def _paper_config(tmp_path):
    config = validate_config(yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))
    for task in ("hoc", "pubmedqa", "bioasq7b", "bioasq8b", "mednli", "medqa"):
        for key in ("path", "corpus"):
            if key in config["tasks"][task]:
                config["tasks"][task][key] = str(tmp_path / config["tasks"][task][key])
    return config


def test_missing_datasets_say_where_they_come_from(tmp_path):
    config = _paper_config(tmp_path)
    lines = check_tasks(config)
    assert len(lines) == 6  # every missing dataset at once
    assert lines[0].startswith("config key tasks.hoc.path: ") and "train.tsv not found" in lines[0]
    mednli = next(line for line in lines if "tasks.mednli" in line)
    assert "PhysioNet" in mednli and "credentialed" in mednli
    assert "ori_pqal.json not found" in next(line for line in lines if "pubmedqa" in line)
    assert "MIT" in next(line for line in lines if "tasks.medqa" in line)


def test_per_task_settings_override_finetune_and_pick_folds(tmp_path):
    config = _paper_config(tmp_path)
    plan = Plan(config)
    hoc = plan.training("hoc")
    assert (hoc["lr"], hoc["batch_size"], hoc["max_length"]) == (2e-5, 32, 128)
    assert hoc["seeds"] == [0, 1, 2, 3, 4] and hoc["patience"] == 5
    assert plan.training("medqa")["batch_size"] == 12
    assert plan.task_folder("pubmedqa", 7).endswith("tasks/pubmedqa/fold7")
    assert plan.task_folder("hoc", 3).endswith("tasks/hoc")
    bad = copy.deepcopy(config)
    shutil.copytree(FIXTURES / "pubmedqa", tmp_path / "data" / "tasks" / "pubmedqa")
    bad["finetune"]["tasks"] = ["pubmedqa"]
    bad["tasks"]["pubmedqa"]["finetune"]["seeds"] = [3, 12]
    with pytest.raises(MopError, match=r"tasks.pubmedqa.finetune.seeds: \[12\]"):
        check_tasks(bad)


def test_cli_prepares_a_task_and_writes_pubmedqa_folds(tmp_path):
    import subprocess
    import sys

    options = json.dumps({"path": str(FIXTURES / "bioasq7b")})
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mop.cli",
            "task",
            "--options",
            options,
            "--out",
            str(tmp_path / "tasks" / "bioasq7b"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert pl.read_parquet(tmp_path / "tasks" / "bioasq7b" / "train.parquet").height == 8
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mop.cli",
            "pubmedqa-folds",
            str(FIXTURES / "pubmedqa" / "ori_pqal.json"),
            "--out",
            str(tmp_path / "pqa"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "pqa").iterdir()) == sorted(
        ["test_set.json"] + [f"pqal_fold{i}" for i in range(10)]
    )
    missing = json.dumps({"path": str(tmp_path / "nowhere")})
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mop.cli",
            "task",
            "--options",
            missing,
            "--out",
            str(tmp_path / "tasks" / "mednli"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "\nmop: error: config key tasks.mednli.path: " in run.stderr
    assert "PhysioNet" in run.stderr and not (tmp_path / "tasks" / "mednli").exists()
