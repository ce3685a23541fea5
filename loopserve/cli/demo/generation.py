"""The generation demo: preferences from a simulated labeller, a reward model, online RL, hot-swaps.

    app ──Generate(prompt, n=4)──▶ policy (generator) ── 4 completions with event_ids ──▶ log
    simulated labeller: of each two completions with clearly different positivity, the more positive
    app ──Submit(Preference(chosen_event_id, rejected_event_id))──▶ FeedbackService ──▶ log
    trainer: reward round (Bradley-Terry on the pairs) ──publish──▶ reward service swaps
             generator round (GRPO against the reward service, KL to the base; DPO by flag) ──gate──▶ publish
    demo: the served versions' samples on fixed evaluation prompts (client id "evaluation", which the
          trainer keeps out of its RL prompt pool), scored by the reward service and by the labeller

The labeller is **simulated**: a TF-IDF + logistic-regression sentiment classifier trained on the data
set's real labels (Fine Food: great / other), standing in for a person who prefers the more enthusiastic
review. Prompts ask for a short review of a food product (templates x products; a reserved set of
products is used only for evaluation).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loopserve.cli.demo import report
from loopserve.cli.demo.stack import Stack, interrupt_on_signals, link_base_versions, new_run_folder
from loopserve.client import Client
from loopserve.datasets import Example, label_set, load_dataset, pull_finefoods
from loopserve.device import resolved_dtype_name
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
EVAL_CLIENT = "evaluation"
"""The demo's evaluation traffic names itself (x-client-id) so the trainer leaves it out of RL."""
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
    store_dir: Path | None = None
    """The store holding the base versions (default <data-dir>/store)."""
    dataset: Path | None = None
    quick: bool = False
    objective: str = "grpo"
    """grpo or ppo (online RL against the reward service), or dpo (straight from the logged pairs)."""
    seed: int = 0
    rounds: int = 3
    """Rounds of (generate, prefer, train): at most this many with `until_served`."""
    until_served: bool = False
    """End after the first round whose generator candidate passes the gate and is served."""
    prompts_per_round: int = 48
    """New prompts the app sends per round (4 completions each, up to 6 preference pairs each)."""
    max_new_tokens: int = 32
    """Completion length, served and in RL."""
    temperature: float = 0.7
    """Sampling temperature, served and in RL (RL's log-probs must be those of what is served)."""
    pair_margin: float = 0.1
    """The labeller states a preference between two completions when their positivity differs by this."""
    grpo_steps: int = 8
    """Rollout batches per generator round (4 prompts x 4 samples each), for GRPO and PPO alike: the
    same prompts and reward calls, so the two objectives are compared on one budget."""
    ppo_epochs: int = 4
    """PPO: epochs over each rollout batch (2 minibatches of 8 sequences each)."""
    eval_prompts: int = 16
    """Fixed evaluation prompts (reserved products), 4 samples each."""
    positive_label: str = "great"
    """The label the simulated labeller prefers (its probability is the 'positivity')."""
    round_timeout_s: float = 1200.0
    dtype: str = "auto"
    """The policy service's weights and the RL trainers' rollouts and forward passes: auto (resolved when the
    demo starts) is bf16 where the hardware multiplies it natively (loopserve.device.pick_dtype: DESIGN's
    ~2x fp32 generation at batch 16, ~1.3x an RL step on a CPU with AMX-BF16), fp32 elsewhere (emulated
    bf16 on an AVX2-only CPU runs several times slower than fp32)."""

    def another_round(self, base: str, serving: str) -> bool:
        """Whether the next round runs (within `rounds`): always, unless `until_served` and a version other
        than the run's `base` already serves."""
        return not (self.until_served and serving != base)

    def apply_quick(self) -> None:
        self.prompts_per_round, self.max_new_tokens, self.eval_prompts = 24, 24, 8
        # Its GRPO run must move the policy clearly past the noise of 6 held-out prompts: at 6 steps the
        # candidate was refused in 2 of 4 runs (reward -0.05 to +0.8 over serving); at 10 steps it passed
        # most runs by +0.9 to +2.7 (about 20 s more), but clean-clone CI still met a refusal (candidate
        # 0.72 against serving 0.82, from a reward model at 0.89 / 0.79 pairwise accuracy). So a second
        # round, on 24 new prompts, only when the first candidate is refused: one refusal in a few runs
        # becomes one in tens, and the usual run still ends after one round.
        self.rounds, self.until_served = 2, True
        self.grpo_steps = 10


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
    rounds_run: int = 0
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


def _precision(opts: GenerationDemoOptions) -> str:
    """The RL trainers' precision for the demo's resolved dtype: bf16 is a bf16 sampling copy and autocast."""
    return "bf16" if opts.dtype == "bfloat16" else "fp32"


def _trainer_flags(opts: GenerationDemoOptions, run: Path) -> list[str]:
    grpo = {
        "group_size": 4,
        "prompts_per_step": 4,
        "steps": opts.grpo_steps,
        "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.temperature,
        # LoRA on q/v: lr 1e-3 moves the policy measurably within a handful of steps on 2 cores (2e-4 did
        # not: KL 3e-4 and an unchanged reward); the KL term and the gate's bound hold it near the base.
        "lr": 1e-3,
        "precision": _precision(opts),
        "eval_samples": 4,
        "eval_batch_prompts": 8,
    }
    ppo = {
        "prompts_per_step": 4,
        "samples_per_prompt": 4,
        "steps": opts.grpo_steps,
        "update_epochs": opts.ppo_epochs,
        "num_minibatches": 2,
        "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.temperature,
        "lr": 1e-3,  # LoRA, as GRPO's
        "value_lr": 1e-3,
        "beta": 0.05,
        "precision": _precision(opts),
    }
    objectives = {
        # A few hundred pairs at most: higher rates than the production defaults, or the head's scale
        # stays near 0 and GRPO's group-normalised advantages are mostly noise. Each round continues the
        # serving version (and its optimizer), so later rounds need not repeat 4 passes over every pair:
        # at most 40 steps, drawn from the whole buffer.
        "reward": {"epochs": 4.0, "max_steps": 40, "max_length": 128, "encoder_lr": 1e-4, "head_lr": 1e-2},
        "grpo": grpo,
        "ppo": ppo,
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
        # A round's prompts count for the generator only (1 each); its pairs count for both. So with the
        # trigger at prompts + 1 the generator is never due on a round's prompts alone, and the reward
        # model is due once the pairs are in (the app sends at least this many: `_preferences`).
        "--round-min-events",
        str(_min_events(opts)),
        "--round-interval-s",
        "100000",
        "--heldout-fraction",
        "0.25",
        "--max-eval-prompts",
        str(opts.eval_prompts),
        "--exclude-clients",
        EVAL_CLIENT,
        "--poll-interval-s",
        "0.5",
        "--seed",
        str(opts.seed),
        "--objectives-json",
        str(path),
    ]


def _min_events(opts: GenerationDemoOptions) -> int:
    return opts.prompts_per_round + 1


def _trainer_rounds(run: Path) -> list[dict[str, Any]]:
    path = run / "trainer" / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class GenerationDemo:
    def __init__(self, opts: GenerationDemoOptions) -> None:
        if opts.quick:
            opts.apply_quick()
        opts.dtype = resolved_dtype_name(opts.dtype)  # the policy's and the RL trainers' one precision
        self.opts = opts

    def _generate(self, app: Client, prompts: list[str], n: int, seed: int | None) -> list[Any]:
        def one(i_p: tuple[int, str]) -> Any:
            i, p = i_p
            return app.generate(
                p,
                n=n,
                max_new_tokens=self.opts.max_new_tokens,
                temperature=self.opts.temperature,
                seed=None if seed is None else seed + 97 * i,
                timeout_s=600,
            )

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, enumerate(prompts)))

    def _evaluate(self, st: GenerationRun, app: Client, labeller: SimulatedLabeller) -> list[tuple[str, str]]:
        prompts = _eval_prompts(self.opts.eval_prompts)
        resps = self._generate(app, prompts, 4, seed=self.opts.seed + 1000)
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
        link_base_versions(
            opts.store_dir or opts.data_dir / "store", run / "store", ["annotator", "generator", "reward"]
        )
        stack = Stack(
            run,
            generator=True,
            trainer_flags=_trainer_flags(opts, run),
            policy_flags=["--max-input-tokens", "128", "--dtype", self.opts.dtype],
        )
        interrupt_on_signals()
        prompts = _prompts(opts.seed)
        try:
            stack.start()
            with report.LiveView(console, lambda: report.gen_table(st), lambda: report.gen_line(st)) as view:
                st.status = "starting the services"
                view.refresh()
                ready = stack.wait_ready()
                with (
                    Client(stack.policy_target, stack.token("client"), timeout_s=600) as app,
                    Client(
                        stack.policy_target, stack.token("client"), timeout_s=600, client_id=EVAL_CLIENT
                    ) as evaluator,
                    Client(stack.policy_target, stack.token("annotator"), timeout_s=120) as people,
                    Client(stack.reward_target, stack.token("client"), timeout_s=300) as rewards,
                ):
                    st.status = f"services ready in {ready:.0f}s; sampling the base version"
                    view.refresh()
                    st.samples_base = self._evaluate(st, evaluator, labeller)
                    seen, base = 0, st.serving
                    for k in range(opts.rounds):
                        if not opts.another_round(base, st.serving):
                            break
                        part = prompts[k * opts.prompts_per_round : (k + 1) * opts.prompts_per_round]
                        st.status = f"round {k + 1}: generating 4 completions for {len(part)} prompts"
                        view.refresh()
                        # Seeded per round and prompt, apart from the evaluation's seeds: `--seed` repeats
                        # the app's samples as far as batching lets bf16 kernels repeat.
                        resps = self._generate(app, part, 4, seed=opts.seed + 10_000 * (k + 1))
                        events = self._preferences(run.name, resps, labeller)
                        people.submit(events)
                        st.prompts_sent += len(part)
                        st.pairs_sent += len(events)
                        st.rounds_run += 1
                        st.status = f"round {k + 1}: trainer (reward model, then {opts.objective})"
                        view.refresh()
                        seen = self._wait_rounds(st, stack, app, seen, view.refresh)
                        st.samples_final = self._evaluate(st, evaluator, labeller)
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

    def _preferences(self, run_name: str, resps: list[Any], labeller: SimulatedLabeller) -> list[Any]:
        """The labeller's preferences between the completions of each prompt: every two that differ in
        positivity by `pair_margin` (a person states no preference between near-equals), at least
        `_min_events` in all (the next-clearest pairs are added when too few are clear) so that the
        trainer's reward round is due."""
        clear: list[tuple[float, Any, Any]] = []
        rest: list[tuple[float, Any, Any]] = []
        for r in resps:
            cs = [c for i, c in enumerate(r.completions) if c.text not in {x.text for x in r.completions[:i]}]
            pos = labeller.positivity([c.text for c in cs])
            for i, j in itertools.combinations(range(len(cs)), 2):
                win, lose = (i, j) if pos[i] >= pos[j] else (j, i)
                margin = pos[win] - pos[lose]
                (clear if margin >= self.opts.pair_margin else rest).append((margin, cs[win], cs[lose]))
        rest.sort(key=lambda x: -x[0])
        chosen = clear + rest[: max(0, _min_events(self.opts) - len(clear))]
        return [
            feedback_pb2.FeedbackEvent(
                idempotency_key=f"{run_name}:{win.event_id}:{lose.event_id}",
                annotator_id="simulated-labeller",
                preference=feedback_pb2.Preference(chosen_event_id=win.event_id, rejected_event_id=lose.event_id),
            )
            for _, win, lose in chosen
        ]

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
        the reward model's pairwise accuracy on held-out pairs: two base samples of the same evaluation
        prompt (never trained on) that the labeller ranks as it ranks the pairs it sends."""
        base, final = st.samples_base, st.samples_final
        r_base = list(rewards.score(base).scores) if base else []
        r_final = list(rewards.score(final).scores) if final else []
        p_base, p_final = labeller.positivity([s for _, s in base]), labeller.positivity([s for _, s in final])
        agree = n = 0
        for i, j in itertools.combinations(range(len(base)), 2):
            if base[i][0] != base[j][0] or abs(p_base[i] - p_base[j]) < self.opts.pair_margin:
                continue
            n += 1
            agree += (p_base[i] > p_base[j]) == (r_base[i] > r_base[j])
        st.summary.update(
            reward_base=sum(r_base) / max(len(r_base), 1),
            reward_final=sum(r_final) / max(len(r_final), 1),
            positivity_base=sum(p_base) / max(len(p_base), 1),
            positivity_final=sum(p_final) / max(len(p_final), 1),
            rm_pairwise_accuracy_eval_prompts=agree / n if n else None,
            rm_eval_pairs=n,
        )
