"""The steps of each model's round, for the one skeleton in trainer/rounds.py.

- AnnotatorLearner: few verified labels, a cross-fitted round from the zero-shot base; many, a held-out
  round on top of the serving weights (trainer.annotation_round says why); off-policy values on the
  logged accept / reject outcomes.
- AnnotatorHeadLearner: the online tier (trainer.annotation_head): a new head on the serving encoder,
  gated by cross-validation, published as a version sharing the encoder's weights, only if LATEST did
  not move meanwhile.
- RewardLearner: Bradley-Terry on pairs (+ ratings, pointwise), gated on held-out pairs.
- GeneratorLearner: SFT (demonstrations), DPO (pairs), GRPO or PPO (online, against the reward
  service), in that order on one candidate with LoRA merged at the end; an SFT-only round needs no
  reward service and becomes the reference of later RL rounds.

Each learner holds its round's data and models between steps; the math is in the objectives' modules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from loopserve.errors import VerificationError
from loopserve.metrics import TRAINER_LOSS
from loopserve.models import encoder_heads, generator
from loopserve.models.encoder_heads import AnnotatorModel, HeadSpec, RewardModel
from loopserve.models.reward_format import STATS_KEY
from loopserve.models.store import ModelStore
from trainer import (
    annotation_head,
    annotation_policy,
    annotation_round,
    dpo,
    generation_rl,
    off_policy,
    ppo,
    reward_model,
    sft,
)
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.annotation_round import AnnotatorCandidate
from trainer.causal_lm import add_lora, merge_lora
from trainer.consumer import ANNOTATOR, ANNOTATOR_HEAD, GENERATOR, REWARD, TrainerState
from trainer.examples import Demonstration, LabelExample, LabelOutcome, LoggedCompletion, heldout
from trainer.gate import (
    GateConfig,
    GateDecision,
    gate_generator,
    gate_off_policy,
    gate_reward_model,
    gate_sft,
    paired_counts,
)
from trainer.pseudo_labels import pseudo_labels
from trainer.rounds import Context, Publication, Skip, prefixed, resume_optimizer

logger = logging.getLogger(__name__)

PROBE_PAIR = ("Is the reward service up?", "Yes.")


def _annotator(folder: Path, device: torch.device, version: str) -> AnnotatorModel:
    model = encoder_heads.load(folder, device)
    if not isinstance(model, AnnotatorModel):
        raise VerificationError(f"annotator {version} has no annotator head")
    return model


# ---- annotator ---------------------------------------------------------------------------------------


def label_probs(
    model: AnnotatorModel, tokenizer: Any, logged: list[LabelOutcome], cfg: AnnotationPolicyConfig
) -> torch.Tensor:
    """(n, L) the served probabilities of `model` on the logged texts."""
    return annotation_policy.predict_logits(model, tokenizer, [o.text for o in logged], cfg).softmax(-1)


def annotator_off_policy(
    cand: AnnotatorCandidate,
    logged: list[LabelOutcome],
    labels: list[str],
    serving_probs: torch.Tensor,
    tokenizer: Any,
    cfg: AnnotationPolicyConfig,
    gate: GateConfig,
) -> None:
    """Off-policy value of the candidate and of serving on the logged outcomes, into the candidate's
    metrics (round record and manifest); the off-policy gate joins the candidate's decision. A
    cross-fitted candidate was trained on every verified label, held-out texts included: its figures are
    in-sample (`ope_in_sample`), so the gate does not read them."""
    if not logged:
        return
    cand_probs = label_probs(cand.model, tokenizer, logged, cfg)
    c, s = off_policy.annotator_estimates(logged, labels, serving_probs, cand_probs, gate.ope_max_weight or math.inf)
    in_sample = cand.regime == "cross-fit"
    cand.metrics.update({**c, "ope_in_sample": float(in_sample)})
    cand.serving_metrics.update(s)
    if in_sample:
        return
    verdict = gate_off_policy(c, s, gate)
    if not verdict.publish:
        cand.decision = GateDecision(False, cand.decision.reasons + verdict.reasons, checked=False)


class AnnotatorLearner:
    model = ANNOTATOR
    name = ANNOTATOR

    def select(self, ctx: Context, state: TrainerState, serving: str) -> None:
        gate, frac = ctx.args.gate, ctx.args.heldout_fraction
        self.folder = ctx.store.path(ANNOTATOR, serving)
        self.spec = HeadSpec.read(self.folder)
        known = set(self.spec.label_names)
        self.items = [x for x in state.labels.values() if x.label in known]
        self.few = len(self.items) < gate.cv_max_items and gate.cv_folds >= 2
        if self.few and len(self.items) < gate.min_cv_items:
            raise Skip(f"{len(self.items)} verified labels, need {gate.min_cv_items}")
        self.evals = [x for x in self.items if heldout(x.text, frac)]
        self.train_items = [x for x in self.items if not heldout(x.text, frac)]
        self.rejects = [x for x in state.bandit if x.label in known and not heldout(x.text, frac)]
        if not self.few and len(self.evals) < gate.min_eval_items:
            raise Skip(f"held-out slice has {len(self.evals)} items, need {gate.min_eval_items}")
        if not self.few and not self.train_items and not self.rejects:
            raise Skip("no training items")
        self.logged = off_policy.held_out_outcomes(
            list(state.outcomes.values()), self.spec.label_names, frac, gate.ope_max_items
        )
        self.cand: AnnotatorCandidate | None = None
        self.opt: torch.optim.Optimizer | None = None

    def load(self, ctx: Context, serving: str) -> None:
        self.tokenizer = encoder_heads.load_tokenizer(self.folder)
        self.serving_model = _annotator(self.folder, ctx.device, serving)

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Serving: its probabilities on the logged outcomes (before a held-out round trains it in place);
        its figures on the labels come from the round itself (cross-fitted or paired). Candidate: the
        round's evaluation and the off-policy values."""
        if self.cand is None:
            self.serving_probs = label_probs(self.serving_model, self.tokenizer, self.logged, ctx.args.annotator)
            return {}
        annotator_off_policy(
            self.cand, self.logged, self.spec.label_names, self.serving_probs, self.tokenizer, ctx.args.annotator,
            ctx.args.gate,
        )  # fmt: skip
        return self.cand.metrics

    def train(self, ctx: Context, state: TrainerState, serving: str) -> dict[str, float]:
        args, cfg = ctx.args, ctx.args.annotator
        if self.few:
            self.cand = self._cross_fit(ctx, state, serving)
        else:
            pseudo = self._pseudo_labels(ctx, state, serving)  # before the round trains the serving weights
            self.opt = annotation_policy.make_optimizer(self.serving_model, cfg)
            resume_optimizer(ctx, state, ANNOTATOR, self.opt, serving)
            self.cand = annotation_round.held_out_round(
                self.serving_model, self.tokenizer, self.train_items, self.rejects, self.evals, cfg, args.gate,
                baseline=state.baseline, optimizer=self.opt, generator=ctx.gen, guard=ctx.guard(ANNOTATOR),
                pseudo=pseudo,
            )  # fmt: skip
        TRAINER_LOSS.labels(objective=ANNOTATOR).set(self.cand.train_metrics.get("loss", float("nan")))
        return prefixed("train_", self.cand.train_metrics)

    def _pseudo_labels(self, ctx: Context, state: TrainerState, serving: str) -> list[LabelExample]:
        """Self-training labels from the serving version, if the gate checked it, on the pooled items that
        nobody labelled and that are not held out (trainer.pseudo_labels says why only then)."""
        cfg = ctx.args.annotator
        if not cfg.heldout_self_training or not ctx.store.get(ANNOTATOR, serving).meta.get("checked"):
            return []
        return pseudo_labels(
            self.serving_model, self.tokenizer, self._pool(state), self.train_items, cfg,
            heldout_fraction=ctx.args.heldout_fraction,
        )  # fmt: skip

    @staticmethod
    def _pool(state: TrainerState) -> list[str]:
        """The items read from the log (kept only while self-training is on) less those a person rejected
        a label for: "not that" is no label to guess over."""
        rejected = {x.text for x in state.bandit}
        return [t for t in state.items if t not in rejected]

    def _cross_fit(self, ctx: Context, state: TrainerState, serving: str) -> AnnotatorCandidate:
        base_folder = ctx.store.path(ANNOTATOR, ctx.store.list(ANNOTATOR)[0])
        if HeadSpec.read(base_folder).label_names != self.spec.label_names:
            base_folder = self.folder  # the label set changed since v0: the serving version is the prior
        meta = ctx.store.get(ANNOTATOR, serving).meta
        return annotation_round.cross_fit_round(
            lambda: _annotator(base_folder, ctx.device, "base"),
            self.serving_model,
            self.tokenizer,
            self.items,
            int(meta.get("cursor", 0)),
            ctx.args.annotator,
            ctx.args.gate,
            serving_checked=bool(meta.get("checked")),
            generator=ctx.gen,
            guard=ctx.guard(ANNOTATOR),
            head_cfg=ctx.args.head,
            pool=self._pool(state),
        )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {ANNOTATOR: self.opt} if self.opt is not None else {}

    def paired_serving_metrics(self) -> dict[str, float]:
        assert self.cand is not None
        return self.cand.serving_metrics

    def gate(self, ctx: Context, candidate: dict[str, float], serving: dict[str, float]) -> GateDecision:
        assert self.cand is not None
        return self.cand.decision  # the round's own gate (trainer.annotation_round) with the off-policy one

    def publication(self, ctx: Context) -> Publication:
        cand = self.cand
        assert cand is not None
        tokenizer = self.tokenizer

        def save(dest: Path) -> None:
            encoder_heads.save(cand.model, tokenizer, dest)

        return Publication(
            save,
            {
                "objective": "annotation_policy",
                "task": self.spec.task,
                "labels": self.spec.label_names,
                # Passed the gate's bar for auto-labelling, calibrated on items it was not trained on:
                # the policy service lets a checked version auto-label (an unchecked one flags every item).
                "checked": cand.decision.checked,
                "evidence": cand.regime,
            },
        )


class AnnotatorHeadLearner:
    model = ANNOTATOR
    name = ANNOTATOR_HEAD

    def select(self, ctx: Context, state: TrainerState, serving: str) -> None:
        self.serving = serving
        self.folder = ctx.store.path(ANNOTATOR, serving)
        self.manifest = ctx.store.get(ANNOTATOR, serving)
        self.spec = HeadSpec.read(self.folder)
        self.items: list[LabelExample] = [x for x in state.labels.values() if x.label in set(self.spec.label_names)]
        if len(self.items) < ctx.args.gate.min_cv_items:
            raise Skip(f"{len(self.items)} verified labels, need {ctx.args.gate.min_cv_items}")
        self.cand: annotation_head.HeadCandidate | None = None

    def load(self, ctx: Context, serving: str) -> None:
        """The serving encoder (kept between rounds while it serves) and the labels' cached embeddings."""
        args = ctx.args
        held = ctx.head_model
        loaded = held is None or held[0] != serving
        if held is None or loaded:
            model = _annotator(self.folder, ctx.device, serving)
            held = ctx.head_model = (serving, model, encoder_heads.load_tokenizer(self.folder))
        _, self.encoder, tokenizer = held
        dtype = annotation_policy.eval_dtype(self.encoder, args.annotator)  # as the services serve it
        if loaded:
            logger.info("online tier: %s embeds labels in %s", serving, dtype)
        # The encoder weights' digest keys the cache: a head-only version shares it with its parent.
        key = self.manifest.files.get(encoder_heads.WEIGHTS_FILE, serving)
        texts = [x.text for x in self.items]
        self.emb = ctx.embeddings.embed(
            self.encoder, tokenizer, texts, key, args.head, args.annotator.max_length, dtype
        )

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Both versions are cross-validated on the same folds inside `train`: nothing before it."""
        return self.cand.metrics if self.cand is not None else {}

    def train(self, ctx: Context, state: TrainerState, serving: str) -> dict[str, float]:
        self.cand = annotation_head.head_round(
            self.encoder,
            self.emb,
            self.items,
            int(self.manifest.meta.get("cursor", 0)),
            ctx.args.head,
            ctx.args.gate,
            serving_checked=bool(self.manifest.meta.get("checked")),
        )
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def paired_serving_metrics(self) -> dict[str, float]:
        assert self.cand is not None
        return self.cand.serving_metrics

    def gate(self, ctx: Context, candidate: dict[str, float], serving: dict[str, float]) -> GateDecision:
        assert self.cand is not None
        return self.cand.decision

    def publication(self, ctx: Context) -> Publication:
        cand = self.cand
        assert cand is not None
        head, spec = cand.head_and_spec(self.encoder.head, self.spec)
        folder = self.folder

        def save(dest: Path) -> list[str]:
            return encoder_heads.save_head(head, spec, dest, folder)

        meta: dict[str, object] = {
            "objective": "annotation_head",
            "task": self.spec.task,
            "labels": self.spec.label_names,
            "checked": cand.decision.checked,
            "evidence": "head cross-validation",
        }
        return Publication(save, meta, if_latest=self.serving)


# ---- reward model ------------------------------------------------------------------------------------


class RewardLearner:
    model = REWARD
    name = REWARD

    def select(self, ctx: Context, state: TrainerState, serving: str) -> None:
        frac = ctx.args.heldout_fraction

        def split(xs: list[Any]) -> tuple[list[Any], list[Any]]:
            return [x for x in xs if not heldout(x.prompt, frac)], [x for x in xs if heldout(x.prompt, frac)]

        self.pairs, self.eval_pairs = split(state.pairs)
        self.ratings, self.eval_ratings = split(state.ratings)
        self.pointwise, self.eval_pointwise = split(state.pointwise)
        if len(self.eval_pairs) < ctx.args.gate.min_eval_pairs:
            raise Skip(f"held-out slice has {len(self.eval_pairs)} pairs, need {ctx.args.gate.min_eval_pairs}")
        self.serving_correct: torch.Tensor | None = None

    def load(self, ctx: Context, serving: str) -> None:
        folder = ctx.store.path(REWARD, serving)
        self.tokenizer = encoder_heads.load_tokenizer(folder)
        model = encoder_heads.load(folder, ctx.device)
        if not isinstance(model, RewardModel):
            raise VerificationError(f"reward model {serving} has no reward head")
        self.rm = model

    def evaluate(self, ctx: Context) -> dict[str, float]:
        cfg = ctx.args.reward
        metrics = reward_model.evaluate_reward_model(
            self.rm, self.tokenizer, self.eval_pairs, self.eval_ratings, self.eval_pointwise, cfg
        )
        correct = reward_model.pairwise_scores(self.rm, self.tokenizer, self.eval_pairs, cfg) > 0.5
        if self.serving_correct is None:
            self.serving_correct = correct
        else:  # the candidate: which held-out pairs each version ranks right, for the paired test
            metrics.update(paired_counts(self.serving_correct, correct), n_train_pairs=float(len(self.pairs)))
        return metrics

    def train(self, ctx: Context, state: TrainerState, serving: str) -> dict[str, float]:
        cfg = ctx.args.reward
        self.opt = reward_model.make_optimizer(self.rm, cfg)
        resume_optimizer(ctx, state, REWARD, self.opt, serving)
        m = reward_model.train_reward_model(
            self.rm, self.tokenizer, self.pairs, self.ratings, self.pointwise, cfg,
            optimizer=self.opt, guard=ctx.guard(REWARD), generator=ctx.gen,
        )  # fmt: skip
        TRAINER_LOSS.labels(objective=REWARD).set(m.get("loss", float("nan")))
        return prefixed("train_", m)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {REWARD: self.opt}

    def paired_serving_metrics(self) -> dict[str, float]:
        return {}

    def gate(self, ctx: Context, candidate: dict[str, float], serving: dict[str, float]) -> GateDecision:
        return gate_reward_model(candidate, serving, ctx.args.gate)

    def publication(self, ctx: Context) -> Publication:
        cfg = ctx.args.reward
        # The version's normalisation statistics, on held-out responses (reward_model.reference_pairs).
        reference = reward_model.reference_pairs(
            self.eval_pairs, self.eval_ratings, self.eval_pointwise, cfg.stats_reference_size
        )
        stats = reward_model.reward_statistics(self.rm, self.tokenizer, reference, cfg)
        rm, tokenizer = self.rm, self.tokenizer

        def save(dest: Path) -> None:
            encoder_heads.save(rm, tokenizer, dest)

        meta: dict[str, object] = {"objective": "reward_model", STATS_KEY: stats.to_meta()}
        return Publication(save, meta, extra_metrics={"reward_mean": stats.mean, "reward_std": stats.std})


# ---- generator ---------------------------------------------------------------------------------------


def reference_version(store: ModelStore) -> str:
    """pi_ref of the KL terms: the newest generator version an SFT-only round published (InstructGPT
    leashes RL to its SFT model), else the oldest version in the store (the base)."""
    versions = store.list(GENERATOR)
    for version in reversed(versions):
        if store.get(GENERATOR, version).meta.get("objective") == "sft":
            return version
    return versions[0]


def eval_prompts(state: TrainerState, frac: float, max_prompts: int) -> tuple[list[str], list[str]]:
    """(train prompts, a fixed held-out subset): the subset is the first `max_prompts` held-out prompts
    in arrival order, so it stays the same from round to round once full."""
    train: list[str] = []
    evals: list[str] = []
    for prompt in state.prompts:
        (evals if heldout(prompt, frac) else train).append(prompt)
    return train, evals[:max_prompts]


class GeneratorLearner:
    """One candidate per round from the serving weights: the listed objectives that have data, in order
    (SFT, DPO, then GRPO or PPO), under LoRA when configured (merged before evaluation). With only SFT
    listed, the round needs no reward service and is gated on the held-out demonstrations alone."""

    model = GENERATOR
    name = GENERATOR

    def select(self, ctx: Context, state: TrainerState, serving: str) -> None:
        args, gate, frac = ctx.args, ctx.args.gate, ctx.args.heldout_fraction
        self.objectives = args.generator_objective_list()
        self.train_demos: list[Demonstration] = [d for d in state.demonstrations if not heldout(d.prompt, frac)]
        self.eval_demos: list[Demonstration] = [d for d in state.demonstrations if heldout(d.prompt, frac)]
        self.run_sft = (
            "sft" in self.objectives and bool(self.train_demos) and len(self.eval_demos) >= gate.min_eval_demos
        )
        self.sft_only = not [o for o in self.objectives if o != "sft"]
        self.run_dpo = self.run_grpo = self.run_ppo = False
        self.logged: list[LoggedCompletion] = []
        if self.sft_only:
            if not self.run_sft:
                raise Skip(
                    f"SFT needs demonstrations: {len(self.train_demos)} to train on, {len(self.eval_demos)} "
                    f"held out (need {gate.min_eval_demos})"
                )
        else:
            if ctx.reward_fn is None:
                raise Skip("no reward function configured")
            self.train_prompts, self.eval_prompts = eval_prompts(state, frac, args.max_eval_prompts)
            self.train_pairs = [p for p in state.pairs if not heldout(p.prompt, frac)]
            self.eval_pairs = [p for p in state.pairs if heldout(p.prompt, frac)]
            if len(self.eval_prompts) < gate.min_eval_prompts:
                raise Skip(f"held-out slice has {len(self.eval_prompts)} prompts, need {gate.min_eval_prompts}")
            self.run_dpo = "dpo" in self.objectives and bool(self.train_pairs)
            self.run_grpo = "grpo" in self.objectives and bool(self.train_prompts)
            self.run_ppo = "ppo" in self.objectives and bool(self.train_prompts)
            if not (self.run_dpo or self.run_grpo or self.run_ppo):
                raise Skip("no training data for the generator objectives")
            self.logged = off_policy.held_out_completions(state.completions, serving, frac, gate.ope_max_completions)
            # Probe the reward service before loading two copies of the generator (a fixed pair, no user text).
            generation_rl.score(ctx.reward_fn, [PROBE_PAIR[0]], [PROBE_PAIR[1]])
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self.full_weights = args.lora.r == 0
        self.serving_logp: list[float] | None = None
        self.ope_serving: dict[str, float] = {}

    def load(self, ctx: Context, serving: str) -> None:
        folder = ctx.store.path(GENERATOR, serving)
        self.tokenizer = generator.load_tokenizer(folder)
        self.policy = generator.load(folder, ctx.device)
        self.ref_version = ""
        if not self.sft_only:
            self.ref_version = ctx.args.generator_ref_version or reference_version(ctx.store)
            ref_folder = ctx.store.path(GENERATOR, self.ref_version)
            self.ref = generator.load(ref_folder, ctx.device).requires_grad_(False)

    def evaluate(self, ctx: Context) -> dict[str, float]:
        args = ctx.args
        if self.sft_only:
            return sft.evaluate_sft(self.policy, self.tokenizer, self.eval_demos, args.sft)
        assert ctx.reward_fn is not None
        m = generation_rl.evaluate_policy(
            self.policy, self.ref, self.tokenizer, self.eval_prompts, ctx.reward_fn, args.grpo
        )
        if self.run_sft:
            m.update(sft.evaluate_sft(self.policy, self.tokenizer, self.eval_demos, args.sft))
        if self.eval_pairs and self.run_dpo:  # DPO's implicit-reward metrics cost two forward passes per pair
            m.update(dpo.evaluate_dpo(self.policy, self.ref, self.tokenizer, self.eval_pairs, args.dpo))
        if self.logged:
            logp = off_policy.completion_logprobs(self.policy, self.tokenizer, self.logged, args.grpo)
            if self.serving_logp is None:
                self.serving_logp = logp
            else:
                m.update(self._off_policy(ctx, logp))
        return m

    def _off_policy(self, ctx: Context, cand_logp: list[float]) -> dict[str, float]:
        """IPS / SNIPS value of the candidate on completions the serving version logged, scored by the
        reward model; the serving version's (w = 1: the logged mean) kept for paired_serving_metrics."""
        assert ctx.reward_fn is not None and self.serving_logp is not None
        logged = self.logged
        rewards = generation_rl.score(ctx.reward_fn, [c.prompt for c in logged], [c.response for c in logged]).tolist()
        max_w = ctx.args.gate.ope_max_weight or math.inf
        self.ope_serving = off_policy.generator_estimates(rewards, self.serving_logp, self.serving_logp)
        return off_policy.generator_estimates(rewards, cand_logp, self.serving_logp, max_w)

    def train(self, ctx: Context, state: TrainerState, serving: str) -> dict[str, float]:
        args = ctx.args
        self.policy = add_lora(self.policy, args.lora)
        policy, tok = self.policy, self.tokenizer
        resume = self.full_weights  # LoRA adapters are re-created each round: no state to resume
        out: dict[str, float] = {}
        if self.run_sft:
            opt = sft.make_optimizer(policy, args.sft)
            if resume and self.sft_only:
                resume_optimizer(ctx, state, "sft", opt, serving)
            m = sft.train_sft(
                policy, tok, self.train_demos, args.sft, optimizer=opt, guard=ctx.guard("sft"), generator=ctx.gen
            )
            TRAINER_LOSS.labels(objective="sft").set(m.get("sft_loss", float("nan")))
            out.update(prefixed("train_", m))
            self._optimizers["sft"] = opt
        if self.run_dpo:
            opt = dpo.make_optimizer(policy, args.dpo)
            if resume:
                resume_optimizer(ctx, state, "dpo", opt, serving)
            m = dpo.train_dpo(
                policy, self.ref, tok, self.train_pairs, args.dpo,
                optimizer=opt, guard=ctx.guard("dpo"), generator=ctx.gen,
            )  # fmt: skip
            TRAINER_LOSS.labels(objective="dpo").set(m.get("dpo_loss", float("nan")))
            out.update(prefixed("train_", m))
            self._optimizers["dpo"] = opt
        if self.run_grpo:
            assert ctx.reward_fn is not None
            opt = generation_rl.make_optimizer(policy, args.grpo)
            if resume:
                resume_optimizer(ctx, state, "grpo", opt, serving)
            m = generation_rl.train_grpo(
                policy, self.ref, tok, self.train_prompts, ctx.reward_fn, args.grpo,
                optimizer=opt, guard=ctx.guard("grpo"), rng=ctx.py_rng,
            )  # fmt: skip
            TRAINER_LOSS.labels(objective="grpo").set(m.get("loss", float("nan")))
            out.update(prefixed("train_grpo_", m))
            self._optimizers["grpo"] = opt
        if self.run_ppo:  # a fresh value head each round (trainer.ppo), so no optimizer state to resume
            assert ctx.reward_fn is not None
            value_head = ppo.value_head_for(policy)
            opt = ppo.make_optimizer(policy, value_head, args.ppo)
            m = ppo.train_ppo(
                policy, self.ref, tok, self.train_prompts, ctx.reward_fn, args.ppo,
                value_head=value_head, optimizer=opt, guard=ctx.guard("ppo"), rng=ctx.py_rng, generator=ctx.gen,
            )  # fmt: skip
            TRAINER_LOSS.labels(objective="ppo").set(m.get("pg_loss", float("nan")))
            out.update(prefixed("train_ppo_", m))
            self._optimizers["ppo"] = opt
        self.policy = merge_lora(policy)
        if self.sft_only:
            out["n_train_demos"] = float(len(self.train_demos))
        return out

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """LoRA adapters are merged and re-created each round, and PPO's value head is fresh each round:
        their optimizer state has no future. Full fine-tuning keeps the others'."""
        if not self.full_weights:
            return {}
        return {k: v for k, v in self._optimizers.items() if k != "ppo"}

    def paired_serving_metrics(self) -> dict[str, float]:
        return self.ope_serving

    def gate(self, ctx: Context, candidate: dict[str, float], serving: dict[str, float]) -> GateDecision:
        gate = ctx.args.gate
        if self.sft_only:
            return gate_sft(candidate, serving, gate)
        decision = gate_generator(candidate, serving, gate)
        if self.logged:
            ope_gate = dataclasses.replace(gate, ope_estimator="snips") if gate.ope_estimator == "dr" else gate
            verdict = gate_off_policy(candidate, serving, ope_gate)
            decision = GateDecision(decision.publish and verdict.publish, decision.reasons + verdict.reasons)
        if self.run_sft:
            sft_decision = gate_sft(candidate, serving, gate)
            decision = GateDecision(decision.publish and sft_decision.publish, decision.reasons + sft_decision.reasons)
        return decision

    def publication(self, ctx: Context) -> Publication:
        policy, tokenizer = self.policy, self.tokenizer

        def save(dest: Path) -> None:
            policy.save_pretrained(dest, safe_serialization=True)
            tokenizer.save_pretrained(dest)

        if self.sft_only:
            return Publication(save, {"objective": "sft"})
        objective = "+".join(o for o in self.objectives if o in self._optimizers)
        return Publication(save, {"objective": objective, "reference": self.ref_version})
