"""The generation demo: preferences from a simulated labeller, a reward model, online RL, hot-swaps.

    app ──Generate(prompt, n=4)──▶ policy (generator) ── 4 completions with event_ids ──▶ log
    simulated labeller: of (a, b) and (c, d), the more positive one is chosen
    app ──Submit(Preference(chosen_event_id, rejected_event_id))──▶ FeedbackService ──▶ log
    trainer: reward round (Bradley-Terry on the pairs) ──publish──▶ reward service swaps
             generator round (GRPO against the reward service, KL to the base; DPO by flag) ──gate──▶ publish
    demo: the served versions' samples on fixed evaluation prompts, scored by the reward service and by the
          labeller

The labeller is **simulated**: a TF-IDF + logistic-regression sentiment classifier trained on the data
set's real labels (Fine Food: great / other), standing in for a person who prefers the more enthusiastic
review. Prompts ask for a short review of a food product (templates x products; a reserved set of
products is used only for evaluation).
"""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loopserve.client import Client
from loopserve.datasets import Example, label_set, load_dataset, pull_finefoods
from loopserve.demo import report
from loopserve.demo.stack import Stack, link_base_versions, new_run_folder, sigterm_as_interrupt
from loopserve.feedback.v1 import feedback_pb2

logger = logging.getLogger(__name__)

PRODUCTS = [
    "green tea",
    "dark roast coffee",
    "oatmeal cookies",
    "peanut butter",
    "dog treats",
    "cat food",
    "hot sauce",
    "olive oil",
    "granola bars",
    "dried mango",
    "protein powder",
    "maple syrup",
    "gluten-free pasta",
    "instant noodles",
    "sea salt chips",
    "chai latte mix",
    "almond milk",
    "chocolate truffles",
    "gummy bears",
    "jasmine rice",
    "honey",
    "beef jerky",
    "coconut water",
    "espresso beans",
    "herbal tea",
    "baby formula",
    "trail mix",
    "popcorn kernels",
    "balsamic vinegar",
    "cereal",
    "licorice",
    "energy drink",
    "sparkling water",
    "cocoa powder",
    "pancake mix",
    "salsa",
    "canned tuna",
    "mixed nuts",
    "rice crackers",
    "strawberry jam",
    "earl grey tea",
    "sugar-free candy",
    "k-cup coffee pods",
    "quinoa",
    "soy sauce",
    "cinnamon",
    "vanilla extract",
    "apple chips",
    "puppy biscuits",
    "ramen broth",
    "hazelnut spread",
    "matcha powder",
    "cold brew concentrate",
]
EVAL_PRODUCTS = [
    "sourdough crackers",
    "lemon tea",
    "pretzels",
    "blueberry muffins mix",
    "smoked almonds",
    "decaf coffee",
    "fruit leather",
    "chamomile tea",
    "dark chocolate bar",
    "salted caramels",
    "banana chips",
    "ginger snaps",
    "wild rice",
    "pistachios",
    "mint tea",
    "barbecue sauce",
]
TEMPLATES = [
    "Write a short product review of {p}.",
    "In two sentences, review the {p} you bought online.",
    "Write a one-paragraph customer review for {p}.",
    "Share a brief review of {p} for other shoppers.",
    "Write a short review of a brand of {p} you tried recently.",
]


@dataclass
class GenerationDemoOptions:
    data_dir: Path = Path("./.loopserve")
    dataset: Path | None = None
    quick: bool = False
    objective: str = "grpo"
    """grpo (online RL against the reward service) or dpo (straight from the logged pairs)."""
    seed: int = 0
    rounds: int = 3
    """Rounds of (generate, prefer, train)."""
    prompts_per_round: int = 48
    """New prompts the app sends per round (4 completions each, 2 preference pairs each)."""
    max_new_tokens: int = 40
    """Completion length, served and in RL."""
    eval_prompts: int = 16
    """Fixed evaluation prompts (reserved products), 2 samples each."""
    positive_label: str = "great"
    """The label the simulated labeller prefers (its probability is the 'positivity')."""
    round_timeout_s: float = 1200.0

    def apply_quick(self) -> None:
        self.rounds, self.prompts_per_round, self.max_new_tokens, self.eval_prompts = 1, 24, 24, 8


class SimulatedLabeller:
    """TF-IDF + logistic regression on the data's labels: P(positive label | text)."""

    def __init__(self, train: list[Example], test: list[Example], positive: str, seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
        )
        self.model.fit([e.text for e in train], [e.label for e in train])
        self.index = list(self.model.classes_).index(positive)
        self.test_accuracy = float(self.model.score([e.text for e in test], [e.label for e in test]))

    def positivity(self, texts: list[str]) -> list[float]:
        return [float(p[self.index]) for p in self.model.predict_proba(texts)]


@dataclass
class GenerationRun:
    opts: GenerationDemoOptions
    run: Path
    t0: float = field(default_factory=time.monotonic)
    status: str = "starting"
    prompts_sent: int = 0
    pairs_sent: int = 0
    serving: str = "v0"
    reward_serving: str = "v0"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Per served generator version: labeller positivity of its eval samples."""
    samples_base: list[tuple[str, str]] = field(default_factory=list)
    samples_final: list[tuple[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    labeller_accuracy: float = float("nan")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _prompts(seed: int) -> list[str]:
    out = [t.format(p=p) for p in PRODUCTS for t in TEMPLATES]
    random.Random(seed).shuffle(out)
    return out


def _eval_prompts(n: int) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(p=p) for i, p in enumerate(EVAL_PRODUCTS[:n])]


def _trainer_flags(opts: GenerationDemoOptions, run: Path) -> list[str]:
    min_events = (3 * opts.prompts_per_round + 1) // 2  # 1.5 per prompt: see the comment below
    grpo = {
        "group_size": 4,
        "prompts_per_step": 2 if opts.quick else 4,
        "steps": 4 if opts.quick else 8,
        "max_new_tokens": opts.max_new_tokens,
        "lr": 2e-4,
        "eval_samples": 2,
        "eval_batch_prompts": 8,
    }
    objectives = {
        "reward": {"epochs": 3.0, "max_length": 128},
        "grpo": grpo,
        "dpo": {"lr": 5e-5, "epochs": 1.0, "max_completion_tokens": 64, "batch_size": 4},
        "lora": {"r": 8},
        "gate": {"min_eval_pairs": 8, "min_eval_prompts": 4, "kl_bound": 0.5},
    }
    path = run / "objectives.json"
    path.write_text(json.dumps(objectives, indent=2))
    return [
        "--models",
        "reward,generator",
        "--generator-objectives",
        opts.objective,
        # A round's pairs (2 per prompt, fewer if two completions are identical) make the reward model
        # due; the generator counts the round's prompts and pairs (3 per prompt), so it is due only once
        # the pairs are in, never on the prompts alone (1 per prompt, plus the evaluation prompts once).
        "--round-min-events",
        str(min_events),
        "--round-interval-s",
        "100000",
        "--heldout-fraction",
        "0.25",
        "--max-eval-prompts",
        str(opts.eval_prompts),
        "--poll-interval-s",
        "0.5",
        "--seed",
        str(opts.seed),
        "--objectives-json",
        str(path),
    ]


def _trainer_rounds(run: Path) -> list[dict[str, Any]]:
    path = run / "trainer" / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class GenerationDemo:
    def __init__(self, opts: GenerationDemoOptions) -> None:
        if opts.quick:
            opts.apply_quick()
        self.opts = opts

    def _generate(self, app: Client, prompts: list[str], n: int, seed: int | None) -> list[Any]:
        def one(i_p: tuple[int, str]) -> Any:
            i, p = i_p
            return app.generate(
                p,
                n=n,
                max_new_tokens=self.opts.max_new_tokens,
                temperature=1.0,
                seed=None if seed is None else seed + 97 * i,
                timeout_s=600,
            )

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, enumerate(prompts)))

    def _evaluate(self, st: GenerationRun, app: Client, labeller: SimulatedLabeller) -> list[tuple[str, str]]:
        prompts = _eval_prompts(self.opts.eval_prompts)
        resps = self._generate(app, prompts, 2, seed=self.opts.seed + 1000)
        samples = [(p, c.text) for p, r in zip(prompts, resps, strict=True) for c in r.completions]
        pos = labeller.positivity([s for _, s in samples])
        st.evals.append({"version": resps[0].model_version, "positivity": sum(pos) / len(pos), "t": st.elapsed()})
        return samples

    def run(self) -> Path:
        from rich.console import Console

        opts, console = self.opts, Console()
        path = opts.dataset or pull_finefoods(opts.data_dir / "data")
        train, test = load_dataset(path, seed=opts.seed)
        labels = label_set(train + test)
        if opts.positive_label not in labels:
            opts.positive_label = labels[0]
        run = new_run_folder(opts.data_dir, "generation")
        (run / "options.json").write_text(json.dumps(asdict(opts), indent=2, default=str))
        st = GenerationRun(opts, run)
        console.print(f"run folder: {run}")
        labeller = SimulatedLabeller(train, test, opts.positive_label, opts.seed)
        st.labeller_accuracy = labeller.test_accuracy
        console.print(
            f"simulated labeller (TF-IDF + LR on the data's labels): test accuracy {labeller.test_accuracy:.3f}"
        )
        link_base_versions(opts.data_dir / "store", run / "store", ["annotator", "generator", "reward"])
        stack = Stack(
            run,
            generator=True,
            trainer_flags=_trainer_flags(opts, run),
            policy_flags=["--max-input-tokens", "128"],
        )
        sigterm_as_interrupt()
        prompts = _prompts(opts.seed)
        try:
            stack.start()
            with report.LiveView(console, lambda: report.gen_table(st), lambda: report.gen_line(st)) as view:
                st.status = "starting the services"
                view.refresh()
                ready = stack.wait_ready()
                with (
                    Client(stack.policy_target, stack.token("client"), timeout_s=600) as app,
                    Client(stack.policy_target, stack.token("annotator"), timeout_s=120) as people,
                    Client(stack.reward_target, stack.token("client"), timeout_s=300) as rewards,
                ):
                    st.status = f"services ready in {ready:.0f}s; sampling the base version"
                    view.refresh()
                    st.samples_base = self._evaluate(st, app, labeller)
                    seen = 0
                    for k in range(opts.rounds):
                        part = prompts[k * opts.prompts_per_round : (k + 1) * opts.prompts_per_round]
                        st.status = f"round {k + 1}: generating 4 completions for {len(part)} prompts"
                        view.refresh()
                        resps = self._generate(app, part, 4, seed=None)
                        events = []
                        for r in resps:
                            # The labeller ranks the 4 completions; the most positive is preferred over the
                            # least and over the third (clear margins make consistent preferences).
                            cs = list(r.completions)
                            pos = labeller.positivity([c.text for c in cs])
                            ranked = [cs[i] for i in sorted(range(len(cs)), key=lambda i: -pos[i])]
                            for win, lose in ((ranked[0], ranked[-1]), (ranked[0], ranked[-2])):
                                if win.text == lose.text:
                                    continue
                                events.append(
                                    feedback_pb2.FeedbackEvent(
                                        idempotency_key=f"{run.name}:{win.event_id}:{lose.event_id}",
                                        annotator_id="simulated-labeller",
                                        preference=feedback_pb2.Preference(
                                            chosen_event_id=win.event_id, rejected_event_id=lose.event_id
                                        ),
                                    )
                                )
                        people.submit(events)
                        st.prompts_sent += len(part)
                        st.pairs_sent += len(events)
                        st.status = f"round {k + 1}: trainer (reward model, then {opts.objective})"
                        view.refresh()
                        seen = self._wait_rounds(st, stack, app, seen, view.refresh)
                        st.samples_final = self._evaluate(st, app, labeller)
                        view.refresh()
                    st.status = "scoring base and final samples with the final reward model"
                    view.refresh()
                    self._final_scores(st, rewards, labeller)
            stack.stop()
        except KeyboardInterrupt:
            stack.stop()
            console.print(f"interrupted: stopped every process the demo started; log and store in {run}")
            raise
        finally:
            stack.stop()
        summary = report.write_generation_report(st)
        console.print(report.summary_lines(summary))
        print(run)
        return run

    def _wait_rounds(self, st: GenerationRun, stack: Stack, app: Client, seen: int, refresh: Any) -> int:
        """Wait for this batch's generator round (the reward round runs just before it)."""
        deadline = time.monotonic() + self.opts.round_timeout_s
        while True:
            stack.check_alive()
            rows = _trainer_rounds(st.run)
            if any(r.get("model") == "generator" and r.get("result") != "deferred" for r in rows[seen:]):
                break
            if time.monotonic() > deadline:
                logger.warning("no generator round within %.0fs", self.opts.round_timeout_s)
                break
            time.sleep(0.5)
            refresh()
        for r in rows[seen:]:
            st.rounds.append({**r, "t": st.elapsed(), "pairs_sent": st.pairs_sent})
            if r.get("model") == "reward" and r.get("version"):
                st.reward_serving = r["version"]
            if r.get("model") == "generator" and r.get("version"):
                deadline = time.monotonic() + 180
                while app.model_info().generator_version != r["version"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                st.serving = r["version"]
        return len(rows)

    def _final_scores(self, st: GenerationRun, rewards: Client, labeller: SimulatedLabeller) -> None:
        """Base and final samples on the same prompts, scored by the final reward model and the labeller;
        the reward model's pairwise accuracy on held-out pairs (base sample pairs the labeller ranked)."""
        base, final = st.samples_base, st.samples_final
        r_base = list(rewards.score(base).scores) if base else []
        r_final = list(rewards.score(final).scores) if final else []
        p_base, p_final = labeller.positivity([s for _, s in base]), labeller.positivity([s for _, s in final])
        agree = n = 0
        for i in range(0, len(base) - 1, 2):  # the two base samples of each evaluation prompt
            if p_base[i] == p_base[i + 1] or r_base[i] == r_base[i + 1]:
                continue
            n += 1
            agree += (p_base[i] > p_base[i + 1]) == (r_base[i] > r_base[i + 1])
        st.summary.update(
            reward_base=sum(r_base) / max(len(r_base), 1),
            reward_final=sum(r_final) / max(len(r_final), 1),
            positivity_base=sum(p_base) / max(len(p_base), 1),
            positivity_final=sum(p_final) / max(len(p_final), 1),
            rm_pairwise_accuracy_eval_prompts=agree / n if n else None,
            rm_eval_pairs=n,
        )
