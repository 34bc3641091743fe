import copy
import subprocess
import sys
import tomllib

import pytest
import yaml

from mop.config import load_config, preflight, validate_config
from mop.errors import MopError
from tests.conftest import REPO


def default_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults():
    config = validate_config(default_config())
    assert config["partition"]["ufactor"] == 30
    assert config["pretrain"]["reduction_factor"] == 8
    assert config["kgs"]["hpo-demo"]["genes"] is False
    assert config["results"] == "results"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["partition"].update(k=["four"]),
            "config key partition.k[0]: 'four' is not of type 'integer'",
        ),
        (lambda c: c.update(typo=1), "Additional properties are not allowed"),
        (lambda c: c["pretrain"].update(lr=-1), "config key pretrain.lr"),
        (lambda c: c["kgs"].update({"../evil": c["kgs"]["hpo-demo"]}), "config key kgs"),
        (lambda c: c.pop("models"), "'models' is a required property"),
    ],
)
def test_schema_violations_name_the_key(change, message):
    config = default_config()
    change(config)
    with pytest.raises(MopError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(config)


def test_preflight_refuses_unknown_alias_and_too_large_k(tmp_path):
    config = validate_config(default_config())
    config["results"] = str(tmp_path)
    preflight(copy.deepcopy(config))
    bad = copy.deepcopy(config)
    bad["base_models"] = ["pubmedbert"]
    with pytest.raises(MopError, match="unknown model alias 'pubmedbert'"):
        preflight(bad)
    bad = copy.deepcopy(config)
    bad["partition"]["k"] = [100000]
    bad["finetune"]["k"] = 100000
    with pytest.raises(
        MopError, match=r"K = 100000 is larger than the \d+ entities of KG 'hpo-demo'"
    ):
        preflight(bad)
    bad = copy.deepcopy(config)
    bad["models"]["scibert"] = {"hub": "allenai/scibert_scivocab_uncased"}
    bad["base_models"] = ["scibert"]
    with pytest.raises(MopError, match="not in the local Hugging Face cache and downloads are off"):
        preflight(bad)


def test_check_config_command_exits_non_zero_with_one_line(tmp_path):
    bad = default_config()
    bad["partition"]["k"] = [0]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [sys.executable, "-m", "mop.cli", "check-config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert [x for x in result.stderr.splitlines() if "error" in x] == [
        "mop: error: config key partition.k[0]: 0 is less than the minimum of 1"
    ]
    ok = subprocess.run(
        [sys.executable, "-m", "mop.cli", "check-config", str(REPO / "config" / "config.yaml")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr


def test_load_config_reads_files():
    config = load_config(REPO / "config" / "config.yaml")
    assert config["base_models"] == ["minilm-l6"]


def test_conda_env_pins_the_same_packages_as_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "workflow" / "envs" / "mop.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(deps)
    assert "python=3.11" in env["dependencies"]


def test_every_key_of_the_schema_is_documented():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    doc = (REPO / "config" / "README.md").read_text()

    def keys(node, path):
        for key, sub in (node.get("properties") or {}).items():
            yield f"{path}{key}", key
            if isinstance(sub, dict) and sub.get("type") == "object":
                yield from keys(sub, f"{path}{key}.")

    forms = ("`{k}`", "`{k}:", "`{k}.", "{k}`")
    missing = [
        path
        for path, key in keys(schema, "")
        if not any(form.format(k=key) in doc for form in forms)
    ]
    assert missing == []


def test_every_settings_dataclass_default_is_the_schemas():
    """A default is defined once, in the schema; a dataclass used outside the workflow
    must not drift from it."""
    from dataclasses import fields

    from mop.config import schema_defaults
    from mop.finetune import FinetuneConfig
    from mop.fusion import OPTION_FIELDS, MixtureConfig
    from mop.pretrain import PretrainConfig

    for cls, section, rename in (
        (FinetuneConfig, "finetune", {}),
        (PretrainConfig, "pretrain", {}),
        (MixtureConfig, "finetune", {f: k for k, f in OPTION_FIELDS.items()}),
    ):
        schema = schema_defaults(section)
        shared = 0
        for f in fields(cls):
            key = rename.get(f.name, f.name)
            if key in schema and key != "seed":
                assert f.default == schema[key], f"{cls.__name__}.{f.name} vs {section}.{key}"
                shared += 1
        assert shared >= (7 if cls is MixtureConfig else 12)


def test_every_keyword_default_is_the_schemas():
    """Functions the library offers outside the workflow (the probe's builder and wording,
    the KG tokenizer) default to what the schema fills in, so a call without the workflow
    builds what a config with the key left out builds."""
    import inspect
    from dataclasses import fields

    from mop.config import schema_defaults
    from mop.pretrain import tokenize_kg
    from mop.tasks.probe import Wording, build_probe

    def plain(value: object) -> object:
        return list(value) if isinstance(value, tuple) else value

    for func, section, expected in (
        (build_probe, "tasks.probe", 6),
        (tokenize_kg, "pretrain", 2),
    ):
        schema = schema_defaults(section)
        params = inspect.signature(func).parameters
        # `wording` (None: the default wording) is checked field by field below
        shared = [name for name in params if name in schema and name != "wording"]
        for name in shared:
            assert plain(params[name].default) == schema[name], f"{func.__name__}({name})"
        assert len(shared) == expected, shared
    wording = schema_defaults("tasks.probe.wording")
    assert {f.name: plain(f.default) for f in fields(Wording)} == wording


def test_commands_fill_missing_options_from_the_schema():
    from mop.finetune import FinetuneConfig

    cfg = FinetuneConfig.from_options({"lr": 1e-3, "route_loss": 3.0}, seed=2, mixture="moe-k1")
    assert (cfg.lr, cfg.seed, cfg.epochs, cfg.pooling) == (1e-3, 2, 3, "cls")
    assert (cfg.mixture.kind, cfg.mixture.top_k, cfg.mixture.route_loss) == ("moe", 1, 3.0)
    assert cfg.mixture.importance == 0.1
