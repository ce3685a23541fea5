"""The generation pipeline's stages on tiny models with a planted signal: SFT on demonstrations,
PPO with a value network, and the reward service's normalised rewards.

The generator is the 2-layer Llama over a 15-word vocabulary of test_trainer_objectives; the planted
reward is the share of "a" tokens in a completion, the planted demonstrations alternate "a b".
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import math
import random
import shutil
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from grpc import aio

from loopserve import auth
from loopserve.cli import command as cli
from loopserve.cli.demo import generation as demo_generation
from loopserve.cli.demo.generation import GenerationDemoOptions
from loopserve.client import AsyncClient
from loopserve.config import RewardConfig
from loopserve.feedback_log import Feedback, open_feedback_log
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import RewardModel
from loopserve.models.reward_format import STATS_KEY
from loopserve.models.store import ModelStore
from loopserve.reward.v1 import reward_pb2 as pb
from reward_service.app import RewardApp
from tests.e2e import test_trainer_loop as loop_tests
from tests.unit import test_trainer_objectives as objectives
from tests.unit.test_reward_runtime import tiny_reward_version
from tests.unit.test_trainer_objectives import HELD_PROMPTS, PROMPTS, fraction_of_a, tiny_lm
from trainer import __main__ as trainer_main
from trainer import generation_rl, ppo, reward_model, sft
from trainer.examples import Demonstration
from trainer.gate import GateConfig, gate_generator, gate_sft
from trainer.loop import read_rounds, run_trainer
from trainer.reward_client import ServiceReward
from trainer.reward_model import RewardModelConfig

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


# ---- normalised rewards in the reward service ------------------------------------------------------

WORDS = "the coffee tea arrived stale fresh great awful price box taste love never again would buy".split()


def reference_set(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.sample(WORDS, 4)), " ".join(rng.sample(WORDS, 6))) for _ in range(n)]


REFERENCE = reference_set(32, 0)
ROLLOUTS = reference_set(24, 1)  # what the policy would send: other texts than the reference set's


def publish_with_stats(store, folder, **kw) -> str:
    """Publish a reward version as the trainer does: its statistics on REFERENCE in the manifest."""
    model, tok = encoder_heads.load(folder), encoder_heads.load_tokenizer(folder)
    assert isinstance(model, RewardModel)
    stats = reward_model.reward_statistics(model, tok, REFERENCE, RewardModelConfig(max_length=64))
    assert stats.source == "publish" and stats.n == len(REFERENCE)
    return store.publish_version("reward", folder, meta={STATS_KEY: stats.to_meta()}, **kw).version


def affine_version(src, dest, scale: float, shift: float):
    """The same reward model with r' = scale * r + shift: another raw scale, the same preferences."""
    shutil.copytree(src, dest)
    model = encoder_heads.load(dest)
    with torch.no_grad():
        model.head.weight.mul_(scale)
        model.head.bias.mul_(scale).add_(shift)
    encoder_heads.save(model, encoder_heads.load_tokenizer(dest), dest)
    return dest


@pytest.fixture
async def reward_app(tmp_path) -> AsyncIterator[tuple[RewardApp, ModelStore]]:
    store = ModelStore(tmp_path / "store")
    publish_with_stats(store, tiny_reward_version(tmp_path / "v0"))
    # fp32, as the statistics were computed at publish: the checks below are exact arithmetic of the
    # normalisation (mean 0 and std 1 on the reference set by construction), which bf16's rounding blurs.
    cfg = RewardConfig(
        data_dir=tmp_path, port=0, metrics_port=-1, max_wait_ms=2.0, watch_interval_s=0.1, dtype="float32"
    )
    cfg.max_input_tokens = 64
    app = RewardApp(cfg)
    await app.start()
    yield app, store
    await app.stop(grace_s=0)


def reward_client(app: RewardApp) -> AsyncClient:
    return AsyncClient(f"127.0.0.1:{app.port}", auth.read_token(app.cfg.token_path, "client"), timeout_s=30.0)


async def test_normalised_rewards_have_the_declared_range_and_keep_their_order(reward_app):
    app, _ = reward_app
    async with reward_client(app) as c:
        raw = await c.score(ROLLOUTS)
        norm = await c.score(ROLLOUTS, normalised=True, clip=1.5)
        default = await c.score(ROLLOUTS, normalised=True)
        on_reference = await c.score(REFERENCE, normalised=True, clip=100.0)
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(aio.AioRpcError) as err:
                await c.score(ROLLOUTS[:1], normalised=True, clip=bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "clip must be" in err.value.details()
    # The trainer's client: an empty completion (EOS first) is not sent and scores the bottom of the range.
    trainer_reward = ServiceReward(
        f"127.0.0.1:{app.port}", auth.read_token(app.cfg.token_path, "client"), normalised=True
    )
    try:
        with_empty = await asyncio.to_thread(trainer_reward, [ROLLOUTS[0], ("a prompt", ""), ROLLOUTS[1]])
    finally:
        trainer_reward.close()
    assert with_empty == pytest.approx([default.scores[0], -5.0, default.scores[1]], abs=1e-5)
    # A raw request (the default) is what it always was; the response says which scale it is on.
    assert raw.scale == pb.REWARD_SCALE_RAW and raw.clip == 0.0
    assert (norm.scale, norm.clip, default.clip) == (pb.REWARD_SCALE_NORMALISED, 1.5, 5.0)
    mean, std = norm.reference_mean, norm.reference_std
    assert std > 0 and (mean, std) == (raw.reference_mean, raw.reference_std)
    r, n = list(raw.scores), list(norm.scores)
    assert all(-1.5 <= x <= 1.5 for x in n)
    assert any(abs(x) == pytest.approx(1.5) for x in n) and any(abs(x) < 1.4 for x in n)  # both kinds occur
    for x, y in zip(r, n, strict=True):
        assert y == pytest.approx(max(-1.5, min(1.5, (x - mean) / std)), abs=1e-4)
    order = sorted(range(len(r)), key=lambda i: r[i])
    assert all(n[i] <= n[j] + 1e-6 for i, j in itertools.pairwise(order))  # order kept (ties only at the clip)
    # On the reference set itself the normalised rewards have mean 0 and std 1, by construction.
    ref = torch.tensor(list(on_reference.scores))
    assert ref.mean().item() == pytest.approx(0.0, abs=1e-3) and ref.std().item() == pytest.approx(1.0, abs=1e-3)


async def test_a_reward_swap_mid_training_leaves_the_normalised_scale_steady(reward_app, tmp_path, lm_tokenizer):
    """GRPO trains against the service through the trainer's own reward client (normalised); halfway, a
    reward version with a raw scale 8x wider and 20 higher is published and swapped in."""
    app, store = reward_app
    target, token = f"127.0.0.1:{app.port}", auth.read_token(app.cfg.token_path, "client")
    trainer_reward = ServiceReward(target, token, normalised=True, clip=5.0)
    raw_reward = ServiceReward(target, token)
    policy = tiny_lm(lm_tokenizer)
    ref_lm = copy.deepcopy(policy).requires_grad_(False)
    cfg = generation_rl.GRPOConfig(
        group_size=4, prompts_per_step=2, steps=2, max_new_tokens=6, lr=2e-3, chat_template=False
    )
    seen: list[tuple[str, list[float]]] = []

    def recording(pairs):
        scores = trainer_reward(pairs)
        seen.append((trainer_reward.versions[-1], list(scores)))
        return scores

    opt = generation_rl.make_optimizer(policy, cfg)
    try:
        await asyncio.to_thread(
            generation_rl.train_grpo, policy, ref_lm, lm_tokenizer, PROMPTS, recording, cfg, optimizer=opt
        )
        before_norm, before_raw = await asyncio.to_thread(lambda: (trainer_reward(ROLLOUTS), raw_reward(ROLLOUTS)))
        v1 = affine_version(store.path("reward", "v0"), tmp_path / "v1", scale=8.0, shift=20.0)
        await asyncio.to_thread(publish_with_stats, store, v1, parent="v0")
        deadline = time.monotonic() + 20
        while await asyncio.to_thread(lambda: (raw_reward(ROLLOUTS[:1]), raw_reward.versions[-1])[1]) != "v1":
            assert time.monotonic() < deadline, "the reward service never swapped to v1"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(
            generation_rl.train_grpo, policy, ref_lm, lm_tokenizer, PROMPTS, recording, cfg, optimizer=opt
        )
        after_norm, after_raw = await asyncio.to_thread(lambda: (trainer_reward(ROLLOUTS), raw_reward(ROLLOUTS)))
    finally:
        trainer_reward.close()
        raw_reward.close()
    assert {v for v, _ in seen} == {"v0", "v1"}  # training ran on both versions
    assert all(-5.0 <= x <= 5.0 for _, scores in seen for x in scores)
    # The raw scale moved (8x wider, +20); the normalised one the trainer sees did not.
    assert after_raw == pytest.approx([8 * x + 20 for x in before_raw], rel=1e-3, abs=1e-3)
    assert after_norm == pytest.approx(before_norm, abs=1e-3)


# ---- the pipeline in the trainer: SFT, then PPO against the SFT policy ----------------------------

base_store, data_dir = loop_tests.base_store, loop_tests.data_dir  # the tiny v0 store and its copy


def test_demonstrations_imported_by_the_cli_train_an_sft_version_that_ppo_then_leashes_to(data_dir, tmp_path):
    """`loopserve log import --demonstrations` brings demonstrations in; an SFT-only round trains on them
    (and on an edit), passes its gate and publishes v1 as `objective: sft`; a PPO round then runs with
    v1 as the reference of its KL term (the serving version's KL to the reference is exactly 0)."""
    rng = random.Random(3)
    prompts = [" ".join(rng.sample(loop_tests.LM_WORDS, 3)) for _ in range(40)]
    demo_file = tmp_path / "demos.jsonl"
    demo_file.write_text("".join(json.dumps({"prompt": p, "response": "a b a b a b"}) + "\n" for p in prompts))
    log_url = str(data_dir / "feedback.sqlite3")
    argv = ["log", "import", "--demonstrations", str(demo_file), "--log-url", log_url]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0  # idempotent: the second import stores nothing
    (tmp_path / "bad.jsonl").write_text('{"prompt": "secret words", "response": ""}\n')
    assert cli.main(["log", "import", "--demonstrations", str(tmp_path / "bad.jsonl"), "--log-url", log_url]) != 0
    with open_feedback_log(log_url) as log:
        assert log.stats().decisions == len(prompts)
        log.append_decisions([loop_tests.generation("E0", "say a b", "c d")])
        assert log.append_feedback([Feedback("edit", "k-E0", event_id="E0", text="a b a b")], {})[0].accepted
    ppo_cfg = ppo.PPOConfig(
        prompts_per_step=4, samples_per_prompt=2, steps=2, update_epochs=2, max_new_tokens=6, chat_template=False
    )
    args = loop_tests.small_args(
        data_dir,
        models="generator",
        generator_objectives="sft",
        sft=sft.SFTConfig(lr=3e-3, batch_size=8, epochs=2, chat_template=False),
        ppo=ppo_cfg,
    )
    state = run_trainer(args, reward_fn=fraction_of_a)
    assert len(state.demonstrations) == len(prompts) + 1 and {d.source for d in state.demonstrations} == {
        "import",
        "edit",
    }
    assert list(state.prompts) == ["say a b"]  # the served (edited) one: demonstrations are not RL prompts
    store = ModelStore(data_dir / "store")
    sft_round = read_rounds(args)[-1]
    assert sft_round["result"] == "published", sft_round
    assert sft_round["metrics"]["sft_nll"] < sft_round["serving_metrics"]["sft_nll"]
    assert store.get("generator", "v1").meta["objective"] == "sft"

    # Served traffic arrives; the PPO round's reference is the SFT version v1 (the serving one).
    with open_feedback_log(log_url) as log:
        log.append_decisions([loop_tests.generation(f"S{i}", p, "c d") for i, p in enumerate(prompts)])
    args.generator_objectives = "ppo"
    run_trainer(args, reward_fn=fraction_of_a)
    ppo_round = read_rounds(args)[-1]
    assert ppo_round["result"] in ("published", "gated") and ppo_round["serving"] == "v1", ppo_round
    assert ppo_round["serving_metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)  # pi_ref = v1, not the base v0
    m = ppo_round["metrics"]
    assert m["train_ppo_updates"] == ppo_cfg.steps * ppo_cfg.update_epochs * ppo_cfg.num_minibatches
    assert m["train_ppo_v_loss_last_epoch"] < m["train_ppo_v_loss_first_epoch"]


def test_the_demos_objective_flag_reaches_the_trainer_with_ppo_settings(tmp_path):
    """`loopserve demo --generation --objective ppo`: the option reaches the trainer process's flags, and
    the PPO section the demo writes is one the trainer accepts (the round itself: the test above)."""
    _, demo = cli.parse_command(["demo", "--generation", "--quick", "--objective", "ppo"], environ={})
    opts = cli.demo_options(demo)
    assert isinstance(opts, GenerationDemoOptions) and opts.objective == "ppo"
    opts.apply_quick()
    flags = demo_generation._trainer_flags(opts, tmp_path)
    assert flags[flags.index("--generator-objectives") + 1] == "ppo"
    args = trainer_main.read_args(flags, environ={})
    assert args.generator_objectives == "ppo" and args.reward_normalised
    assert (args.ppo.steps, args.ppo.prompts_per_step * args.ppo.samples_per_prompt) == (
        opts.grpo_steps,
        args.grpo.prompts_per_step * args.grpo.group_size,
    )  # the same rollout budget as GRPO
    assert args.ppo.update_epochs == opts.ppo_epochs > 1 and args.ppo.max_new_tokens == opts.max_new_tokens


def test_the_quick_demo_runs_a_second_round_only_while_the_base_still_serves():
    """--quick: up to 2 rounds, the second only when the first candidate was refused (v0 still serves)."""
    opts = GenerationDemoOptions(quick=True)
    opts.apply_quick()
    assert (opts.rounds, opts.until_served) == (2, True)
    assert opts.another_round("v0", "v0") and not opts.another_round("v0", "v1")
    full = GenerationDemoOptions()
    assert not full.until_served and full.another_round("v0", "v1")  # the full demo runs every round
