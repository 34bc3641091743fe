"""Every encoder family: random models, the tokenizer's own pair template in pretraining
and fine-tuning, segment ids and poolers per family, and the errors before any job."""

from __future__ import annotations

import re
from pathlib import Path

import adapters
import numpy as np
import polars as pl
import pytest
import torch
import yaml
from adapters import SeqBnConfig

from mop.config import validate_config
from mop.errors import MopError
from mop.finetune import Classifier
from mop.finetune.model import model_part
from mop.fusion import MixtureConfig, add_mixture, mixtures
from mop.kg import read_kg
from mop.models import (
    FAMILIES,
    check_models,
    has_pooler,
    load_base_model,
    load_tokenizer,
    resolve_model,
    supported_families,
    uses_token_types,
)
from mop.pretrain import EntityPredictor, tokenize_kg
from mop.tasks.encode import encode_frame
from tests.conftest import REPO, snakemake
from tests.encoder_kit import FAMILY_TOKENIZERS

FAMILY_NAMES = list(FAMILY_TOKENIZERS)
WITH_SEGMENTS = {"bert", "electra", "albert"}
# What a family's pair looks like around its two texts (prefix, middle, suffix tokens).
LAYOUT = {
    "[CLS]": (["[CLS]"], ["[SEP]"], ["[SEP]"]),
    "<s>": (["<s>"], ["</s>", "</s>"], ["</s>"]),
}


def test_the_seven_families_are_the_ones_adapters_wraps():
    assert supported_families() == sorted(FAMILY_NAMES) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_random_model_of_every_family_is_seeded_and_tiny(family, encoder_models):
    spec = resolve_model(family, encoder_models)
    a, b = load_base_model(spec), load_base_model(spec)
    assert a.config.model_type == family
    assert len(load_tokenizer(spec)) == a.config.vocab_size
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(p.numel() for p in a.parameters()) < 1_100_000
    assert (getattr(a, "pooler", None) is not None) == has_pooler(spec) == FAMILIES[family]
    assert uses_token_types(a.config) == (family in WITH_SEGMENTS)
    assert spec.identifier().startswith(f"random-{family}{{")


def test_a_random_bert_without_arch_is_the_bert_it_always_was(encoder_models):
    plain = dict(encoder_models["bert"], random=dict(encoder_models["bert"]["random"]))
    plain["random"].pop("arch")
    models = encoder_models | {"plain": plain}
    a, b = (load_base_model(resolve_model(x, models)) for x in ("plain", "bert"))
    assert resolve_model("plain", models).identifier() == resolve_model("bert", models).identifier()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pretraining_and_fine_tuning_read_the_same_tokens(
    family, encoder_models, small_kg, tmp_path
):
    """The KG's (head, relation) examples are what the tokenizer makes of the pair, special
    tokens and all; segment ids are written only for models that have segments."""
    spec = resolve_model(family, encoder_models)
    tok = load_tokenizer(spec)
    tokenize_kg(small_kg, spec, tmp_path / "tokens.parquet")
    tokens = pl.read_parquet(tmp_path / "tokens.parquet").head(200)
    kg = read_kg(small_kg)
    names = kg.entities["name"].to_list()
    relations = dict(zip(kg.relations["id"].to_list(), kg.relations["name"].to_list(), strict=True))
    frame = pl.DataFrame(
        {
            "text_a": [names[h] for h in tokens["head"].to_list()],
            "text_b": [relations[r] for r in tokens["relation"].to_list()],
        }
    )
    encoded = encode_frame(frame, tok, 64, "single")
    assert encoded["input_ids"].to_list() == tokens["input_ids"].to_list()
    assert ("token_type_ids" in tokens.columns) == (family in WITH_SEGMENTS)
    if family in WITH_SEGMENTS:
        assert encoded["token_type_ids"].to_list() == tokens["token_type_ids"].to_list()
        assert max(max(t) for t in tokens["token_type_ids"].to_list()) == 1
    prefix, middle, suffix = LAYOUT[tok.convert_ids_to_tokens(tokens["input_ids"][0][0])]
    row = tok.convert_ids_to_tokens(tokens["input_ids"][0])
    head = tok(frame["text_a"][0], add_special_tokens=False)["input_ids"]
    assert row[: len(prefix)] == prefix and row[-len(suffix) :] == suffix
    assert row[len(prefix) + len(head) :][: len(middle)] == middle


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_segment_ids_reach_only_models_that_have_segments(family, encoder_models):
    """A tokenizer's segment 1 given to a model with one token type (RoBERTa, XLM-R), none
    (DeBERTa-v3) or no segment input (DistilBERT): the heads drop it instead of failing."""
    spec = resolve_model(family, encoder_models)
    tok = load_tokenizer(spec)
    enc = tok(["abnormal heart", "seizure"], ["has phenotype", "is a"], padding=True)
    ids = torch.tensor(enc["input_ids"])
    mask = torch.tensor(enc["attention_mask"])
    types = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids)
    for pooling in ("cls", "mean") + (("pooler",) if FAMILIES[family] else ()):
        model = Classifier(load_base_model(spec), 2, 0.0, pooling).eval()
        logits, _ = model(ids, mask, types)
        assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    predictor = EntityPredictor(load_base_model(spec), 5, "cls").eval()
    out = predictor(ids, mask, types)
    assert out.shape == (2, 5)
    if family in WITH_SEGMENTS:  # segments change the vector where the model reads them
        assert not torch.equal(out, predictor(ids, mask, torch.zeros_like(types)))
    else:
        assert torch.equal(out, predictor(ids, mask, torch.zeros_like(types)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mean_pooling_reads_the_real_tokens_in_both_stages(family, encoder_models):
    """`mean` serves every family in pretraining and fine-tuning alike: the mean of the
    last layer over the sequence's real tokens, whatever padding the batch adds."""
    spec = resolve_model(family, encoder_models)
    tok = load_tokenizer(spec)
    alone = tok(["abnormal heart"], ["has phenotype"], return_tensors="pt")
    padded = tok(["abnormal heart", "seizure " * 6], ["has phenotype", "is a"], padding=True)
    ids, mask = torch.tensor(padded["input_ids"]), torch.tensor(padded["attention_mask"])
    assert mask[0].sum() < mask.shape[1]  # the first pair is padded in the batch
    encoder = load_base_model(spec).eval()
    predictor = EntityPredictor(encoder, 3, "mean").eval()
    classifier = Classifier(encoder, 2, 0.0, "mean").eval()
    with torch.no_grad():
        hidden = encoder(alone["input_ids"], alone["attention_mask"]).last_hidden_state
        expected = hidden[0].mean(0)
        assert torch.allclose(predictor.cls(ids, mask)[0], expected, atol=1e-5)
        vector, _ = classifier.pool({"input_ids": ids, "attention_mask": mask})
        assert torch.allclose(vector[0], expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_mixture_replaces_the_fusion_of_every_layer_of_every_family(family, encoder_models):
    """Mixture layers find each family's fusion modules (ALBERT shares one layer's weights,
    so one module serves both layers) and every parameter gets its learning-rate group."""
    model = load_base_model(resolve_model(family, encoder_models))
    adapters.init(model)
    for name in ("p0", "p1"):
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=8))
    add_mixture(model, ["p0", "p1"], MixtureConfig(kind="moe"))
    assert len(mixtures(model)) == (1 if family == "albert" else 2)
    classifier = Classifier(model, 2, 0.0, "mean")
    parts = {model_part(n) for n, _ in classifier.named_parameters()}
    assert parts == {"base", "adapters", "fusion", "head"}
    ids = torch.randint(5, 200, (3, 7))
    _, weights = classifier(ids, torch.ones_like(ids), output_mixture=True)
    fused = next(iter(weights.values()))
    stacked = np.stack([fused[n]["output_adapter"] for n in sorted(fused)])
    assert stacked.shape[1:] == (3, 7, 2)
    np.testing.assert_allclose(stacked.sum(-1), 1.0, atol=1e-5)


def _write_config(folder: Path, config: object) -> Path:
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_an_architecture_adapters_cannot_wrap_stops_before_any_job(tmp_path):
    """A ModernBERT and a GPT-2 folder: one message naming the alias, the model_type and the
    supported families, from the config check and from a real workflow run."""
    from transformers import GPT2Config, ModernBertConfig

    modern = _write_config(tmp_path / "modern", ModernBertConfig(num_hidden_layers=1))
    gpt2 = _write_config(tmp_path / "gpt2", GPT2Config(n_layer=1))
    families = "supported: albert, bert, deberta-v2, distilbert, electra, roberta, xlm-roberta"
    for alias, folder, kind in (("modern", modern, "modernbert"), ("gpt", gpt2, "gpt2")):
        models = {alias: {"path": str(folder)}}
        with pytest.raises(MopError) as err:
            check_models({"models": models, "base_models": [alias]})
        assert f"config key models.{alias}: model_type '{kind}'" in str(err.value)
        assert families in str(err.value)
    # the workflow stops in its pre-flight checks: nothing runs, nothing is written
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    config = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    config["models"]["gpt"] = {"path": str(gpt2)}
    config["base_models"] = ["gpt"]
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(work)
    assert result.returncode != 0
    assert "config key models.gpt: model_type 'gpt2'" in result.stderr and families in result.stderr
    assert not (work / "results").exists()


@pytest.mark.parametrize("key", ["pretrain", "finetune"])
def test_pooler_pooling_on_a_model_without_a_pooler_is_a_config_error(key, encoder_models):
    config = {
        "models": encoder_models,
        "base_models": ["bert", "electra"],
        key: {"pooling": "pooler"},
    }
    with pytest.raises(MopError, match=rf"config key {key}.pooling: .*model electra \(electra\)"):
        check_models(config)
    check_models(config | {"base_models": ["bert", "roberta", "albert", "xlm-roberta"]})
    check_models(config | {key: {"pooling": "cls"}, "base_models": ["electra", "deberta-v2"]})


def test_the_documented_configs_validate_and_resolve(encoder_root, monkeypatch):
    """Every example of docs/encoders.md is a valid `models` section whose random model
    resolves offline (from the folder holding the test tokenizers), one per family."""
    text = (REPO / "docs" / "encoders.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    base = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    monkeypatch.chdir(encoder_root)
    seen = set()
    for block in blocks:
        config = validate_config(base | block)
        for alias, entry in config["models"].items():
            if "random" in entry:
                spec = resolve_model(alias, config["models"])
                seen.add(spec.random["arch"])
                assert load_base_model(spec).config.model_type == spec.random["arch"]
            elif "hub" in entry:
                assert entry["download"] is True  # a real user's entry, fetched once
        check_models(config)
    assert seen == set(FAMILIES)
