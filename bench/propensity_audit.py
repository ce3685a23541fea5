"""Audit of logged completion propensities: the service's logged sequence log-probability against one
teacher-forced recomputation under the serving version with the request's sampling parameters.

The real SmolLM2 behind the real policy service (float32), `--n` completions of one prompt at T=0.8,
top_p=0.9, top_k=50; per completion: the logged propensity, the recomputed one, their difference, and
the value under T=1 / top_p=1 (what a recomputation that ignored the parameters would find). Completions
that end on EOS (not in the logged sum) or re-tokenise differently are listed as not auditable. Writes
bench/results/propensity_audit.json. (tests/service/test_propensity_audit.py asserts the same.)

    .venv/bin/python bench/propensity_audit.py [--n 6]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from loopserve.auth import read_token  # noqa: E402
from loopserve.client import AsyncClient  # noqa: E402
from loopserve.config import PolicyConfig  # noqa: E402
from loopserve.feedback_log import open_feedback_log  # noqa: E402
from loopserve.models import generator, provision  # noqa: E402
from loopserve.models.store import ModelStore  # noqa: E402
from policy_service.app import PolicyApp  # noqa: E402
from policy_service.sampling import sampling_logprobs  # noqa: E402
from policy_service.types import SamplingParams  # noqa: E402

PROMPT = "Write one sentence about green tea."
PARAMS = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=11)


@torch.inference_mode()
def sequence_logprob(model: torch.nn.Module, prompt_ids: list[int], ids: list[int], params: SamplingParams) -> float:
    x = torch.tensor([prompt_ids + ids], device=next(model.parameters()).device)  # (1, P + T)
    logits = model(input_ids=x).logits[0]  # (P + T, V)
    return sum(float(sampling_logprobs(logits[len(prompt_ids) - 1 + t], params)[tok]) for t, tok in enumerate(ids))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "propensity_audit.json")
    args = ap.parse_args()
    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator", "generator"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for model in ("annotator", "generator"):
            v = real.latest(model)
            assert v is not None
            dst = d / "store" / "models" / model
            dst.mkdir(parents=True)
            shutil.copytree(real.path(model, v), dst / v)
            (dst / "LATEST").write_text(v)
        app = PolicyApp(PolicyConfig(data_dir=d, port=0, metrics_port=-1, dtype="float32"))
        await app.start(watch=False)
        try:
            async with AsyncClient(f"127.0.0.1:{app.port}", read_token(app.cfg.token_path, "client")) as c:
                r = await c.generate(
                    PROMPT,
                    n=args.n,
                    max_new_tokens=PARAMS.max_new_tokens,
                    temperature=PARAMS.temperature,
                    top_p=PARAMS.top_p,
                    top_k=PARAMS.top_k,
                    seed=PARAMS.seed,
                )
        finally:
            await app.stop(5)
        with open_feedback_log(app.cfg.feedback_log_url) as log:
            decisions = log.get_decisions([x.event_id for x in r.completions])
        folder = ModelStore(d / "store").path("generator", r.model_version)
        device = app.runtime.opts.device
        model, tok = generator.load(folder, device, torch.float32), generator.load_tokenizer(folder)
        chat = tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = list(tok(chat, add_special_tokens=False)["input_ids"])
        for comp in r.completions:
            ids = list(tok(comp.text, add_special_tokens=False)["input_ids"])
            logged = decisions[comp.event_id].propensity
            row = {"finish_reason": comp.finish_reason, "tokens": comp.num_tokens, "logged": logged}
            if comp.finish_reason == "length" and len(ids) == comp.num_tokens and tok.decode(ids) == comp.text:
                rec = sequence_logprob(model, prompt_ids, ids, PARAMS)
                plain = sequence_logprob(
                    model, prompt_ids, ids, dataclasses.replace(PARAMS, temperature=1.0, top_p=1.0)
                )
                row.update(auditable=True, recomputed=rec, abs_diff=abs(rec - logged), at_t1_top_p1=plain)
            else:
                row["auditable"] = False
            rows.append(row)
            print(json.dumps(row))
    out = {"machine": machine(), "prompt_tokens": len(prompt_ids), "params": dataclasses.asdict(PARAMS), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
