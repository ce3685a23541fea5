"""The generation pipeline's stages on tiny models with a planted signal: SFT on demonstrations,
PPO with a value network, and the reward service's normalised rewards.

The generator is the 2-layer Llama over a 15-word vocabulary of test_trainer_objectives; the planted
reward is the share of "a" tokens in a completion, the planted demonstrations alternate "a b".
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tests import test_trainer_objectives as objectives
from tests.test_trainer_objectives import HELD_PROMPTS, PROMPTS, fraction_of_a, tiny_lm
from trainer import generation_rl, ppo, sft
from trainer.examples import Demonstration
from trainer.gate import GateConfig, gate_generator, gate_sft

lm_tokenizer = objectives.lm_tokenizer  # the module-scoped fixture: the 15-word tokenizer

# ---- SFT -----------------------------------------------------------------------------------------


def demos(prompts: list[str]) -> list[Demonstration]:
    return [Demonstration(p, "a b a b a b", i) for i, p in enumerate(prompts)]


def test_sft_lowers_the_held_out_demonstrations_loss_and_passes_the_gate(lm_tokenizer):
    policy = tiny_lm(lm_tokenizer)
    cfg = sft.SFTConfig(lr=3e-3, batch_size=4, epochs=6, chat_template=False)
    train, held = demos(PROMPTS), demos(HELD_PROMPTS)
    before = sft.evaluate_sft(policy, lm_tokenizer, held, cfg)
    metrics = sft.train_sft(policy, lm_tokenizer, train, cfg, generator=torch.Generator().manual_seed(0))
    after = sft.evaluate_sft(policy, lm_tokenizer, held, cfg)
    assert metrics["steps"] == 12  # ceil(7 / 4) x 6 epochs
    assert after["sft_nll"] < before["sft_nll"] - 1.0, (before, after)  # ~2.7 nats (uniform) to well under
    gate = GateConfig(min_eval_demos=4)
    assert gate_sft(after, before, gate).publish
    refused = gate_sft(before, after, gate)  # the other way round: a rise is refused
    assert not refused.publish and "not below serving" in refused.reasons[0]
    assert not gate_sft(after, before, GateConfig(min_eval_demos=5)).publish  # too few held-out demos


def test_the_sft_loss_counts_only_response_tokens(lm_tokenizer):
    """A demonstration's loss does not depend on how long its prompt is: prompts are given, not learnt."""
    policy = tiny_lm(lm_tokenizer)
    cfg = sft.SFTConfig(chat_template=False)
    one = sft.evaluate_sft(policy, lm_tokenizer, [Demonstration("say", "a b", 0)], cfg)
    long_prompt = sft.evaluate_sft(policy, lm_tokenizer, [Demonstration("say " + "please " * 20, "a b", 0)], cfg)
    logp, mask = sft.response_logprobs(policy, lm_tokenizer, [Demonstration("say", "a b", 0)], cfg)
    assert mask.sum().item() == 3  # "a", "b" and EOS
    assert one["sft_nll"] == pytest.approx(-(logp * mask).sum().item() / 3, rel=1e-5)
    assert long_prompt["sft_nll"] != pytest.approx(one["sft_nll"])  # the context matters, its tokens do not count


# ---- PPO -----------------------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_episode():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])  # the last value is past the episode's end
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.1  # no bootstrap after the last token
    d1 = 0.0 + 0.1 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    expected = [d0 + 0.5 * (d1 + 0.5 * d2), d1 + 0.5 * d2, d2, 0.0]
    torch.testing.assert_close(adv, torch.tensor([expected]))
    torch.testing.assert_close(ret, torch.tensor([[expected[0] + 0.5, expected[1] + 0.2, expected[2] + 0.1, 0.0]]))


def test_the_kl_penalty_is_in_the_reward_and_the_score_lands_on_the_last_token():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = ppo.kl_penalised_rewards(scores, logp, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.05 + 2.0], [0.0, -0.05 - 1.0, 0.0]]))


def test_the_clipped_surrogate_ignores_ratios_past_the_clip_in_the_advantage_direction():
    cfg = ppo.PPOConfig(clip_coef=0.2)
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_(True)  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])  # both already moved past the clip in the advantage's direction
    zeros = torch.zeros(1, 2)
    out = ppo.ppo_losses(new, old, adv, zeros, zeros, zeros, torch.ones(1, 2), cfg)
    out["pg_loss"].backward()
    assert out["pg_loss"].item() == pytest.approx((-1.2 + 0.8) / 2)  # the clipped values
    assert torch.all(new.grad == 0)  # no gradient pushes them further
    assert out["clipfrac"].item() == 1.0


def test_ppo_raises_a_planted_reward_under_the_kl_bound_and_its_value_loss_falls(lm_tokenizer):
    policy = tiny_lm(lm_tokenizer)
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = ppo.PPOConfig(
        prompts_per_step=8,
        samples_per_prompt=4,
        steps=4,
        update_epochs=4,
        num_minibatches=2,
        max_new_tokens=8,
        lr=2e-3,
        value_lr=1e-2,
        beta=0.2,
        chat_template=False,
        precision="fp32",
    )
    ev = generation_rl.GRPOConfig(max_new_tokens=8, chat_template=False, eval_samples=8, precision="fp32")
    value_head = ppo.value_head_for(policy)
    opt = ppo.make_optimizer(policy, value_head, cfg)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    history = [generation_rl.evaluate_policy(policy, ref, lm_tokenizer, HELD_PROMPTS, fraction_of_a, ev)]
    rounds = []
    for _ in range(2):
        rounds.append(
            ppo.train_ppo(
                policy,
                ref,
                lm_tokenizer,
                PROMPTS,
                fraction_of_a,
                cfg,
                value_head=value_head,
                optimizer=opt,
                rng=rng,
                generator=gen,
            )
        )
        history.append(generation_rl.evaluate_policy(policy, ref, lm_tokenizer, HELD_PROMPTS, fraction_of_a, ev))
    rewards = [h["mean_reward"] for h in history]
    assert rewards[2] > rewards[0] + 0.1, rewards
    assert history[2]["kl"] <= 0.5, history
    assert gate_generator(history[2], history[0], GateConfig(kl_bound=0.5, min_eval_prompts=4)).publish
    # The value head starts at zero and fits each rollout batch's returns over its PPO epochs.
    for m in rounds:
        assert m["v_loss_last_epoch"] < m["v_loss_first_epoch"], m
        assert m["updates"] == cfg.steps * cfg.update_epochs * cfg.num_minibatches
