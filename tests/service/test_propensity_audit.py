"""A logged completion's propensity can be audited (slow: the real SmolLM2 behind the real service).

The trainer and the off-policy estimators (trainer/ope.py) weight logged completions by the
propensity the policy service logged with them: the sequence log-probability under the *sampling*
distribution (temperature, top-k, top-p), not under the raw model. This test takes completions from
the live service, reads their decisions back from the feedback log, loads the serving version from
the store on its own, and recomputes each completion's log-probability by one teacher-forced forward
pass with the request's sampling parameters (policy_service/sampling.py `sampling_logprobs`): it finds
the logged propensity, and does not find it under other sampling parameters.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch

from loopserve.auth import read_token
from loopserve.client import AsyncClient
from loopserve.config import PolicyConfig
from loopserve.feedback_log import open_feedback_log
from loopserve.models import generator
from loopserve.models.store import ModelStore
from policy_service import sampling
from policy_service.app import PolicyApp
from policy_service.sampling import sampling_logprobs
from policy_service.types import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "Write one sentence about green tea."
PARAMS = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=11)


@pytest.fixture(scope="module")
def generator_data_dir(real_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("audit")
    for model in ("annotator", "generator"):
        v = real_store.latest(model)
        assert v is not None
        dst = d / "store" / "models" / model
        dst.mkdir(parents=True)
        shutil.copytree(real_store.path(model, v), dst / v)
        (dst / "LATEST").write_text(v)
    return d


@torch.inference_mode()
def _sequence_logprob(model: torch.nn.Module, prompt_ids: list[int], ids: list[int], params: SamplingParams) -> float:
    """log pi(ids | prompt) under the sampling distribution of `params`, teacher-forced in one pass."""
    x = torch.tensor([prompt_ids + ids], device=next(model.parameters()).device)  # (1, P + T)
    logits = model(input_ids=x).logits[0]  # (P + T, V)
    total = 0.0
    for t, tok in enumerate(ids):
        total += float(sampling_logprobs(logits[len(prompt_ids) - 1 + t], params)[tok])
    return total


async def test_a_logged_completion_propensity_is_recomputed_under_the_serving_version(
    generator_data_dir: Path,
) -> None:
    # float32 wherever it runs (auto would pick bf16 on CUDA, whose rounding the tolerance is not for).
    app = PolicyApp(PolicyConfig(data_dir=generator_data_dir, port=0, metrics_port=-1, dtype="float32"))
    await app.start(watch=False)
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}", read_token(app.cfg.token_path, "client")) as c:
            r = await c.generate(
                PROMPT,
                n=3,
                max_new_tokens=PARAMS.max_new_tokens,
                temperature=PARAMS.temperature,
                top_p=PARAMS.top_p,
                top_k=PARAMS.top_k,
                seed=PARAMS.seed,
            )
    finally:
        await app.stop(5)
    log = open_feedback_log(app.cfg.feedback_log_url)
    try:
        decisions = log.get_decisions([comp.event_id for comp in r.completions])
    finally:
        log.close()

    store = ModelStore(generator_data_dir / "store")
    folder = store.path("generator", r.model_version)
    device = app.runtime.opts.device  # the serving device: CUDA where present
    model, tok = generator.load(folder, device, torch.float32), generator.load_tokenizer(folder)
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    prompt_ids = list(tok(chat, add_special_tokens=False)["input_ids"])
    audited = 0
    for comp in r.completions:
        d = decisions[comp.event_id]
        assert d.propensity_kind == "logprob" and d.model_version == r.model_version and d.output == comp.text
        ids = list(tok(comp.text, add_special_tokens=False)["input_ids"])
        if len(ids) != comp.num_tokens or tok.decode(ids) != comp.text:
            continue  # the text re-tokenises differently: not auditable
        eos = sampling.eos_ids_of(model, tok)
        if comp.finish_reason == "stop" and len(eos) == 1:
            ids = [*ids, *eos]  # ended on its end token: that token's probability is in the propensity
        elif comp.finish_reason != "length":
            continue
        audited += 1
        recomputed = _sequence_logprob(model, prompt_ids, ids, PARAMS)
        # Incremental decoding with a KV cache and one full forward differ by float32 rounding only.
        assert recomputed == pytest.approx(d.propensity, abs=1e-3 * len(ids))
        other = _sequence_logprob(model, prompt_ids, ids, dataclasses.replace(PARAMS, temperature=1.0, top_p=1.0))
        assert math.isfinite(other) and abs(other - d.propensity) > 0.1  # the parameters matter
    assert audited >= 2
