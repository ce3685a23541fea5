"""The real bundled models behind the real gRPC service (slow: loads MiniLM and SmolLM2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loopserve.auth import read_token
from loopserve.client import AsyncClient
from loopserve.config import PolicyConfig
from loopserve.models.store import ModelStore
from policy_service.app import PolicyApp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_data_dir(real_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("real")
    for model in ("annotator", "generator"):
        v = real_store.latest(model)
        assert v is not None
        dst = d / "store" / "models" / model
        dst.mkdir(parents=True)
        shutil.copytree(real_store.path(model, v), dst / v)
        (dst / "LATEST").write_text(v)
    return d


async def test_real_annotator_and_generator(real_data_dir: Path) -> None:
    app = PolicyApp(PolicyConfig(data_dir=real_data_dir, port=0, metrics_port=-1))
    await app.start(watch=False)
    try:
        token = read_token(app.cfg.token_path, "client")
        async with AsyncClient(f"127.0.0.1:{app.port}", token) as c:
            info = await c.model_info()
            labels = {lb.name for lb in info.labels}
            r = await c.annotate(
                [
                    "This is the best coffee I have ever had. I love it and will buy it again!",
                    "Stale, bitter and overpriced. The box arrived damaged. Never again.",
                ]
            )
            assert all(a.labels[0].label in labels for a in r.annotations)
            # Zero-shot from label descriptions: the two obvious cases come out right.
            assert [a.labels[0].label for a in r.annotations] == ["great", "other"]

            g = await c.generate("The capital of France is", raw_prompt=True, temperature=0.0, max_new_tokens=8)
            assert "Paris" in g.completions[0].text
            chat = await c.generate("What is the capital of France?", temperature=0.0, max_new_tokens=16)
            assert "Paris" in chat.completions[0].text
    finally:
        await app.stop(1)
