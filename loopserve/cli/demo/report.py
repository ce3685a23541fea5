"""What the demos show: a live table while they run, then report.md, PNG plots and summary.json in the
run folder. Numbers only: no review text, no generated text except the sample generations the
generation report shows on purpose (they are model output, not user data).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from loopserve.cli.demo.annotation import AnnotationRun
    from loopserve.cli.demo.annotators import AnnotatorPool
    from loopserve.cli.demo.generation import GenerationRun


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _self_training(ratio: float) -> str:
    """The report's sentence on the recipe's self-training (its pseudo-labels per human label)."""
    if ratio <= 0:
        return "No self-training (each round trains on the human labels alone; --pseudo-label-ratio 0)."
    return (
        f"Self-training: each model of a cross-fitted round, and the passive baseline's, teaches a student on up to "
        f"{ratio:g} of its confident pseudo-labels per human label on the streamed items nobody labelled."
    )


def live_table(st: AnnotationRun) -> Table:
    budget = int(st.opts.budget_fraction * len(st.train))
    t = Table(title="loopserve demo: annotation", show_header=False, min_width=60)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("status", st.status)
    t.add_row("items streamed", f"{st.items_seen} / {len(st.train)}")
    t.add_row("human labels spent", f"{st.human_labels} / {budget}")
    t.add_row("serving version", st.serving)
    acc = st.versions[-1] if st.versions else None
    t.add_row("test accuracy", f"{_fmt(acc.accuracy)} ({acc.version})" if acc else "n/a")
    auto = st.auto_total / st.items_seen if st.items_seen else None
    t.add_row("share auto-labelled", _fmt(auto))
    last = st.chunks[-1] if st.chunks else None
    t.add_row("review rate (last chunk)", _fmt(last.review_rate if last else None))
    t.add_row("trainer lag", f"{st.human_labels - st.labels_at_last_round} human labels not yet in a round")
    t.add_row("elapsed", f"{st.elapsed():.0f}s")
    return t


class LiveView:
    """A rich Live table on a terminal; one plain line per update elsewhere (CI logs, pipes)."""

    def __init__(self, console: Any, table: Callable[[], Any], line: Callable[[], str]) -> None:
        self.console, self.table, self.line = console, table, line
        self.live: Any = None
        self._last = ""
        self._printed = 0.0

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.table(), console=self.console, auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.table(), refresh=True)
            return
        line = self.line()
        body = line.split("]", 1)[-1]  # without the elapsed-time prefix
        if body != self._last or time.monotonic() - self._printed >= 30:
            print(line, flush=True)
            self._last, self._printed = body, time.monotonic()

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)  # type: ignore[arg-type]


def live_line(st: AnnotationRun) -> str:
    acc = st.versions[-1] if st.versions else None
    auto = st.auto_total / st.items_seen if st.items_seen else 0.0
    return (
        f"[{st.elapsed():5.0f}s] {st.status}: items {st.items_seen}/{len(st.train)}, human labels "
        f"{st.human_labels}, serving {st.serving}, test acc {_fmt(acc.accuracy) if acc else 'n/a'}"
        f"{f' ({acc.version})' if acc else ''}, auto-labelled {auto:.2f}, trainer lag "
        f"{st.human_labels - st.labels_at_last_round}"
    )


def summary_lines(summary: dict[str, Any]) -> str:
    keys = [k for k in summary if isinstance(summary[k], int | float | bool | str)]
    return "\n".join(f"  {k}: {summary[k]}" for k in keys)


# ---- annotation -------------------------------------------------------------------------------------


def _plots_annotation(st: AnnotationRun, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [v.human_labels for v in st.versions]
    ax.plot(xs, [v.accuracy for v in st.versions], "o-", label="loop (each served version)")
    for v in st.versions:
        ax.annotate(v.version, (v.human_labels, v.accuracy), textcoords="offset points", xytext=(3, 4), fontsize=8)
    if st.passive:
        ax.plot(
            [st.passive["labels"]], [st.passive["accuracy"]], "s", color="C1", ms=9, label="passive random, same budget"
        )
    ceiling = st.ceiling.get("accuracy")
    if ceiling:
        kind = "measured" if st.ceiling.get("measured") else "reference, not measured here"
        ax.axhline(ceiling, color="C2", ls="--", label=f"ceiling: all train labels ({kind})")
        ax.axhline(0.95 * ceiling, color="C2", ls=":", label="95% of the ceiling")
    ax.axvline(st.opts.budget_fraction * len(st.train), color="grey", ls=":", label="human budget")
    ax.set_xlabel("human labels spent")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_labels.png", dpi=110)
    plt.close(fig)
    files.append("accuracy_vs_labels.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    items = [c.items for c in st.chunks]
    ax.plot(items, [c.review_rate for c in st.chunks], label="review rate (flagged needs_review)")
    ax.plot(items, [c.auto_share for c in st.chunks], label="share auto-labelled")
    pts = [(c.items, c.auto_accuracy) for c in st.chunks if c.auto_accuracy is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label="auto-label accuracy (vs the data's labels)")
    ax.set_xlabel("train items streamed")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "review_and_auto_labels.png", dpi=110)
    plt.close(fig)
    files.append("review_and_auto_labels.png")

    swaps = [v for v in st.versions if v.published_at and v.served_at]
    if swaps:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar([v.version for v in swaps], [max(0.0, v.served_at - v.published_at) for v in swaps])  # type: ignore[operator]
        ax.set_ylabel("publish to serve (s)")
        ax.set_xlabel("version")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "swaps.png", dpi=110)
        plt.close(fig)
        files.append("swaps.png")
    return files


def write_annotation_report(st: AnnotationRun, pool: AnnotatorPool) -> dict[str, Any]:
    opts, out = st.opts, st.run
    base = st.versions[0].accuracy if st.versions else float("nan")
    final = st.versions[-1].accuracy if st.versions else float("nan")
    ceiling = float(st.ceiling.get("accuracy", float("nan")))
    passive_acc = float(st.passive.get("accuracy", float("nan")))
    budget = int(opts.budget_fraction * len(st.train))
    swaps = [
        {"version": v.version, "publish_to_serve_s": round(v.served_at - v.published_at, 3)}
        for v in st.versions
        if v.published_at and v.served_at
    ]
    has_ceiling = math.isfinite(ceiling)
    ds = st.dataset or {}
    statuses = [it.status for it in st.items.values()]
    first_checked = next((v for v in st.versions[1:]), None)
    summary: dict[str, Any] = {
        "demo": "annotation",
        "run_folder": str(out),
        "dataset_accuracy": ds.get("accuracy"),
        "dataset_items": ds.get("items"),
        "dataset_by_source": ds.get("by_source"),
        "auto_labelled_by_unchecked_versions": st.auto_unchecked,
        "backlog_items": statuses.count("backlog"),
        "reannotated_decisions": st.reannotated,
        "first_checked_version_labels": first_checked.human_labels if first_checked else None,
        "human_labels": st.human_labels,
        "train_items": len(st.train),
        "test_items": len(st.test),
        "human_share": st.human_labels / max(len(st.train), 1),
        "budget": budget,
        "accuracy_base": base,
        "accuracy_final": final,
        "final_version": st.versions[-1].version if st.versions else None,
        "accuracy_passive": passive_acc,
        "passive_labels": st.passive.get("labels"),
        "accuracy_ceiling": ceiling,
        "ceiling_measured": bool(st.ceiling.get("measured")),
        "share_of_ceiling": final / ceiling if has_ceiling else None,
        "target_95pct_of_ceiling_met": bool(final >= 0.95 * ceiling) if has_ceiling else None,
        "target_human_share_30pct_met": bool(st.human_labels <= 0.3 * len(st.train)),
        "beats_passive": bool(final > passive_acc),
        "improved_over_base": bool(final > base),
        "auto_labelled_share": st.auto_total / max(st.items_seen, 1),
        "auto_label_accuracy": st.auto_correct / st.auto_total if st.auto_total else None,
        "review_rate_first_chunk": st.chunks[0].review_rate if st.chunks else None,
        "review_rate_last_chunk": st.chunks[-1].review_rate if st.chunks else None,
        "annotator_error_rate": opts.error_rate,
        "annotator_error_rate_observed": pool.observed_error_rate,
        "annotator_disagreement_rate": pool.disagreement_rate,
        "versions": [vars(v) for v in st.versions],
        "rounds": [
            {
                k: r.get(k)
                for k in ("round", "result", "version", "serving", "seconds", "human_labels", "cursor", "reasons")
            }
            for r in st.rounds
        ],
        "swaps": swaps,
        "chunks": [vars(c) for c in st.chunks],
        "passive": st.passive,
        "wall_s": st.elapsed(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plots = _plots_annotation(st, out)
    ceiling_note = (
        f"measured in this run ({st.ceiling.get('seconds', 0):.0f}s: all {len(st.train)} train labels, 3 epochs)"
        if st.ceiling.get("measured")
        else "a **reference figure from DESIGN.md, not measured in this run** (MiniLM fully fine-tuned on all "
        "4,000 Fine Food train labels, 3 epochs, 256 tokens, ~14 min on 2 cores); `--measure-ceiling` trains it"
        if has_ceiling
        else "not known for this data set: `--measure-ceiling` measures it"
    )
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    lines = [
        "# loopserve demo: annotation",
        "",
        f"Run folder: `{out}` · wall time {st.elapsed():.0f}s · {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        "**The annotators were simulated** from the data set's real human labels (Amazon Fine Food "
        f"reviews: each review's own score): {opts.annotators} simulated annotators with a mean error rate of "
        f"{opts.error_rate:.0%} (observed {pool.observed_error_rate:.1%}), {opts.double_review:.0%} of reviewed "
        f"items reviewed twice (disagreement on {pool.disagreement_rate:.0%} of those).",
        "",
        "## Result (as measured)",
        "",
        f"**The labelled data set** (`dataset.jsonl`, what `loopserve dataset export` writes: per item the human "
        f"label, else the latest served version's label): {ds.get('items', 0)} items at accuracy "
        f"{_fmt(ds.get('accuracy'))} against the data's labels, for **{st.human_labels} human interactions**.",
        "",
        "| source | items | accuracy |",
        "| --- | --- | --- |",
        *[f"| {k} | {v['items']} | {v['accuracy']:.3f} |" for k, v in sorted((ds.get("by_source") or {}).items())],
        "",
        f"Items auto-labelled on the word of an unchecked version: {st.auto_unchecked}. Backlog at the end: "
        f"{summary['backlog_items']} items. Re-annotation after swaps: {st.reannotated} decisions. First checked "
        f"version served after {summary['first_checked_version_labels']} human labels.",
        "",
        "| | test accuracy |",
        "| --- | --- |",
        f"| base (v0, zero-shot) | {base:.3f} |",
        f"| loop, final ({summary['final_version']}, {st.human_labels} human interactions) | {final:.3f} |",
        f"| passive random sampling, same budget ({st.passive.get('labels', 0):.0f} labels), same training | "
        f"{passive_acc:.3f} |",
        f"| ceiling: all train labels | {_fmt(ceiling if has_ceiling else None)} |",
        "",
        f"- Human interactions: {st.human_labels} on {len(st.train)} train items "
        f"({summary['human_share']:.1%}; target at most 30%: {met(summary['target_human_share_30pct_met'])}).",
        f"- Final accuracy is {_fmt(summary['share_of_ceiling'])} of the ceiling"
        + (f" (target at least 95%: {met(summary['target_95pct_of_ceiling_met'])})." if has_ceiling else "."),
        f"- Against passive sampling at equal budget: {final - passive_acc:+.3f} ({met(summary['beats_passive'])}).",
        f"- The ceiling is {ceiling_note}.",
        f"- Auto-labelled: {summary['auto_labelled_share']:.1%} of the streamed items, at accuracy "
        f"{_fmt(summary['auto_label_accuracy'])} against the data's labels; review rate from "
        f"{_fmt(summary['review_rate_first_chunk'])} (first chunk) to {_fmt(summary['review_rate_last_chunk'])} "
        "(last chunk).",
        "",
        "![accuracy against human labels](accuracy_vs_labels.png)",
        "",
        "![review rate and auto-labels](review_and_auto_labels.png)",
        "",
        "## Versions served",
        "",
        "| version | human labels when trained | test accuracy | publish to serve (s) | evaluation (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v in st.versions:
        lag = f"{v.served_at - v.published_at:.2f}" if v.published_at and v.served_at else "-"
        lines.append(f"| {v.version} | {v.human_labels} | {v.accuracy:.3f} | {lag} | {v.eval_seconds:.1f} |")
    lines += [
        "",
        "Trainer rounds:",
        "",
        "| round | result | version | seconds | human labels | why not |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in st.rounds:
        why = "; ".join(r.get("reasons") or [])
        lines.append(
            f"| {r.get('round')} | {r.get('result')} | {r.get('version') or '-'} | {r.get('seconds', 0):.0f} | "
            f"{r.get('human_labels')} | {why} |"
        )
    if "swaps.png" in plots:
        lines += ["", "![publish to serve](swaps.png)"]
    lines += [
        "",
        "## How it ran",
        "",
        f"- The app streamed {len(st.train)} train items through `Annotate` in chunks of {opts.chunk}. Each "
        f"chunk's share of the budget (a pace line: after n items at most {opts.budget_fraction:.0%} of n "
        f"interactions, {budget} in all) went first to a random {opts.audit_fraction:.0%} audit of the "
        "confident items (checked versions only), then to the router's picks: while an unchecked version "
        "served (it flags every item), the items nearest the centres of a k-means clustering of the chunk; "
        "once a checked version served, the least certain flagged item of each cluster"
        + {
            "always": ", and what its flagged items left of the share to the least certain of its confident items. ",
            "stream-end": ", and of the share its flagged items left, what the rest of the stream could not absorb "
            "at their rate to the least certain of its confident items (spread over the stream). ",
            "never": " (the share its flagged items left carried over to later flagged items). ",
        }[opts.top_up]
        + "Flagged items left over went to the backlog; only a checked version's confident items were "
        "auto-labelled, and each newly served version re-annotated the backlog and the auto-labelled items. "
        "Feedback went through `FeedbackService.Submit` (accept, or a correction with the right label).",
        f"- The app asked the trainer for a round (as Label Studio's Start training does) at 12 labels, then "
        f"{opts.round_growth:g}x more, then every {opts.round_labels}, and waited for one that had read them "
        f"(its log cursor). Under {opts.cv_max_items} verified labels a round trains from the "
        "zero-shot base on all of them (epochs scaled to their number) and is judged by 2-fold cross-fitting "
        "(out-of-fold accuracy must beat the majority answer in a paired test; no significant regression "
        "against the serving version on the labels it never saw; temperature fitted out of fold); from "
        f"then on the serving version trains on, with {opts.heldout_fraction:.0%} of the verified items "
        f"held out for the gate (at least {opts.min_eval_items}). max_length {opts.max_length} tokens. "
        + _self_training(opts.annotator_config().pseudo_label_ratio),
        "- Once it handed a round's worth of labels over, the app waited for that round and its swap before "
        "streaming on (pacing to 2 CPU cores); every served version was evaluated on the test split "
        f"({len(st.test)} items) through the real gRPC `Annotate`, weights served in {opts.serve_dtype} "
        "(the offline baselines were evaluated in the same dtype).",
        "- The passive baseline bought the same number of labels for random train items from the same "
        "simulated pool and trained offline with the trainer's own code, config and round schedule.",
        "",
        f"Files: {', '.join(plots)}, summary.json, logs/ (one per process), trainer/rounds.jsonl, store/, "
        "feedback.sqlite3.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


# ---- generation -------------------------------------------------------------------------------------


def gen_table(st: GenerationRun) -> Table:
    t = Table(title="loopserve demo: generation", show_header=False, min_width=60)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("status", st.status)
    t.add_row("prompts sent / preference pairs", f"{st.prompts_sent} / {st.pairs_sent}")
    t.add_row("serving generator / reward model", f"{st.serving} / {st.reward_serving}")
    last = st.evals[-1] if st.evals else None
    t.add_row(
        "labeller positivity of served samples", f"{_fmt(last['positivity'])} ({last['version']})" if last else "n/a"
    )
    t.add_row("elapsed", f"{st.elapsed():.0f}s")
    return t


def gen_line(st: GenerationRun) -> str:
    last = st.evals[-1] if st.evals else None
    pos = f"{last['positivity']:.3f} ({last['version']})" if last else "n/a"
    return (
        f"[{st.elapsed():5.0f}s] {st.status}: prompts {st.prompts_sent}, pairs {st.pairs_sent}, serving "
        f"generator {st.serving}, reward {st.reward_serving}, positivity {pos}"
    )


def _plots_generation(st: GenerationRun, gen_rounds: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if gen_rounds:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
        xs = list(range(1, len(gen_rounds) + 1))
        a1.plot(xs, [r["serving_metrics"].get("mean_reward", float("nan")) for r in gen_rounds], "o-", label="serving")
        a1.plot(xs, [r["metrics"].get("mean_reward", float("nan")) for r in gen_rounds], "s-", label="candidate")
        a1.set_xlabel("generator round")
        a1.set_ylabel("mean reward (held-out prompts)")
        a1.legend(fontsize=8)
        a1.grid(alpha=0.3)
        a2.plot(xs, [r["metrics"].get("kl", float("nan")) for r in gen_rounds], "o-", color="C3")
        a2.set_xlabel("generator round")
        a2.set_ylabel("KL to the base (nats / token)")
        a2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "reward_and_kl.png", dpi=110)
        plt.close(fig)
        files.append("reward_and_kl.png")
    if st.evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(len(st.evals)), [e["positivity"] for e in st.evals], "o-")
        ax.set_xticks(range(len(st.evals)), [e["version"] for e in st.evals])
        ax.set_ylabel("labeller P(positive), eval prompts")
        ax.set_xlabel("served generator version")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "positivity.png", dpi=110)
        plt.close(fig)
        files.append("positivity.png")
    return files


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:400]


def write_generation_report(st: GenerationRun) -> dict[str, Any]:
    opts, out = st.opts, st.run
    gen_rounds = [r for r in st.rounds if r.get("model") == "generator" and r.get("result") != "skipped"]
    rm_rounds = [r for r in st.rounds if r.get("model") == "reward" and r.get("result") != "skipped"]
    published = [r for r in gen_rounds if r.get("result") == "published"]
    rm_published = [r for r in rm_rounds if r.get("result") == "published"]
    kl_final = published[-1]["metrics"].get("kl") if published else 0.0
    rm_acc = (rm_published or rm_rounds or [{"metrics": {}}])[-1]["metrics"].get("pairwise_accuracy")
    s = st.summary
    summary: dict[str, Any] = {
        "demo": "generation",
        "objective": opts.objective,
        "run_folder": str(out),
        "prompts": st.prompts_sent,
        "preference_pairs": st.pairs_sent,
        "rounds_run": st.rounds_run,
        "reward_base": s.get("reward_base"),
        "reward_final": s.get("reward_final"),
        "kl_final": kl_final,
        "rm_pairwise_accuracy": rm_acc,
        "rm_pairwise_accuracy_eval_prompts": s.get("rm_pairwise_accuracy_eval_prompts"),
        "rm_eval_pairs": s.get("rm_eval_pairs", 0),
        "positivity_base": s.get("positivity_base"),
        "positivity_final": s.get("positivity_final"),
        "final_version": st.serving,
        "reward_model_version": st.reward_serving,
        "labeller_test_accuracy": st.labeller_accuracy,
        "reward_improved": bool((s.get("reward_final") or 0) > (s.get("reward_base") or 0)),
        "rounds": [
            {k: r.get(k) for k in ("model", "round", "result", "version", "serving", "seconds", "reasons", "metrics")}
            for r in st.rounds
        ],
        "evals": st.evals,
        "wall_s": st.elapsed(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plots = _plots_generation(st, gen_rounds, out)
    lines = [
        "# loopserve demo: generation",
        "",
        f"Run folder: `{out}` · wall time {st.elapsed():.0f}s · objective {opts.objective}",
        "",
        "**The preference labeller was simulated**: a TF-IDF + logistic-regression sentiment classifier "
        f"trained on the data set's real labels (test accuracy {st.labeller_accuracy:.3f}); of two completions "
        "of the same prompt it prefers the one it finds more positive. No person judged these texts.",
        "",
        "## Result (as measured)",
        "",
        f"- {st.prompts_sent} prompts, 4 served completions each, {st.pairs_sent} preference pairs through "
        "`FeedbackService.Submit` (Preference with chosen / rejected event ids).",
        f"- Final reward model ({st.reward_serving}) score of the base (v0) vs the final ({st.serving}) "
        f"generator's samples on {opts.eval_prompts} reserved evaluation prompts: "
        f"{_fmt(s.get('reward_base'))} -> {_fmt(s.get('reward_final'))}.",
        f"- Labeller positivity of the same samples: {_fmt(s.get('positivity_base'))} -> "
        f"{_fmt(s.get('positivity_final'))}.",
        f"- KL of the final version to the base (trainer's held-out estimate, nats/token): {_fmt(kl_final)}.",
        f"- Reward-model pairwise accuracy on the trainer's held-out pairs: {_fmt(rm_acc)}; on base-sample "
        f"pairs of the evaluation prompts: {_fmt(s.get('rm_pairwise_accuracy_eval_prompts'))} "
        f"({s.get('rm_eval_pairs', 0)} pairs).",
        "",
        "## Rounds",
        "",
        "| round | model | result | version | serving mean reward | candidate mean reward | KL | RM pairwise acc | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in st.rounds:
        m, sm = r.get("metrics") or {}, r.get("serving_metrics") or {}
        lines.append(
            f"| {r.get('round')} | {r.get('model')} | {r.get('result')} | {r.get('version') or '-'} | "
            f"{_fmt(sm.get('mean_reward'))} | {_fmt(m.get('mean_reward'))} | {_fmt(m.get('kl'))} | "
            f"{_fmt(m.get('pairwise_accuracy'))} | {r.get('seconds', 0):.0f} |"
        )
    lines += [""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Samples: base (v0) and final side by side", "", f"| prompt | base v0 | final {st.serving} |"]
    lines += ["| --- | --- | --- |"]
    for (p, b), (_, f) in list(zip(st.samples_base, st.samples_final, strict=False))[::4][:8]:
        lines.append(f"| {_cell(p)} | {_cell(b)} | {_cell(f)} |")
    lines += [
        "",
        "## How it ran",
        "",
        f"- {st.rounds_run} round(s)"
        f"{f' (at most {opts.rounds}, ending once a candidate was served)' if opts.until_served else ''}: "
        f"each, the app sent {opts.prompts_per_round} new prompts, 4 completions each "
        f"(max {opts.max_new_tokens} new tokens, temperature {opts.temperature:g}, served in {opts.dtype}); "
        "of every two "
        f"completions of a prompt whose positivity differs by at least {opts.pair_margin:g} the labeller "
        "preferred the more positive; the trainer then ran a reward-model round (Bradley-Terry) and a "
        f"generator round ({opts.objective}, {opts.grpo_steps} rollout batches of 4 prompts x 4 samples"
        f"{f', {opts.ppo_epochs} PPO epochs each' if opts.objective == 'ppo' else ''}, LoRA r=8 on "
        "q/v, KL to the base; gate: held-out mean reward up, KL under 0.5); the services hot-swapped what "
        "passed the gate.",
        f"- Evaluation: {opts.eval_prompts} prompts about products never used in training, 4 samples each "
        "with a fixed seed, sent with client id `evaluation`, which the trainer keeps out of its RL prompt "
        "pool.",
        "- Model output is shown above on purpose; review texts from the data set are never written here.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary
