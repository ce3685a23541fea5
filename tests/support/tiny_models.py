"""Tiny random models in the real on-disk formats, with the real tokenizers: for tests about
mechanics (batching, swaps, validation), never about quality."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, BertConfig, LlamaConfig, LlamaForCausalLM

from loopserve.models import encoder_heads, generator
from loopserve.models.encoder_heads import AnnotatorModel, HeadSpec, LabelSpec, RewardModel
from loopserve.models.provision import encoder_dir

REPO = Path(__file__).resolve().parents[2]
REAL_STORE = REPO / ".loopserve" / "store"
LABELS = [LabelSpec("great", "a glowing review"), LabelSpec("other", "a mixed or negative review")]


def _tiny_encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return AutoModel.from_config(cfg)


def tiny_annotator(dest: Path, seed: int = 0, labels: list[LabelSpec] | None = None) -> Path:
    tok = encoder_heads.load_tokenizer(encoder_dir())
    model = AnnotatorModel(_tiny_encoder(seed), HeadSpec(kind="annotator", task="sentiment", labels=labels or LABELS))
    encoder_heads.save(model, tok, dest)
    return dest


def tiny_reward(dest: Path, seed: int = 0) -> Path:
    tok = encoder_heads.load_tokenizer(encoder_dir())
    encoder_heads.save(RewardModel(_tiny_encoder(seed), HeadSpec(kind="reward")), tok, dest)
    return dest


def generator_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, from the real store's base version (made by `loopserve models pull`)."""
    d = REAL_STORE / "models" / "generator" / "v0"
    if not (d / "tokenizer.json").is_file():
        from loopserve.models import provision
        from loopserve.models.store import ModelStore

        provision.pull(ModelStore(REAL_STORE), models=["generator"])
    return d


def tiny_generator(dest: Path, seed: int = 0) -> Path:
    tok = generator.load_tokenizer(generator_tokenizer_dir())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest
