"""bench/learning.py's replay of the loop, on the tiny annotator: the figures of the learning-curve results
come from this code, so its mechanics are tested here (the curves themselves are measured, not asserted).

The loop replay streams chunks, routes a budget of them to a simulated annotator pool, refits the online
tier's head after every chunk and runs the trainer's round at each round point; the passive replay trains
ungated at each budget on random labels; `--ungated-twin` trains the loop's labels that way too.
bench/cold_start.py's label choices (which items each routing strategy buys) are tested here as well."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.learning import parser, run_loop, run_passive
from loopserve.datasets import Example
from loopserve.models.store import ModelStore
from tests.e2e.test_trainer_loop import base_store, review  # noqa: F401  (fixtures)


def reviews(n: int, seed: int, split: str) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.6
        out.append(Example(review(rng, positive), "great" if positive else "other", split))
    return out


SMALL = ["--budgets", "24,48", "--early-rounds", "12", "--chunk", "40", "--fraction", "0.5", "--max-length", "32"]
CONFIDENT = ["--review-threshold", "0.999"]  # the tiny model is sure of itself early: flag enough to spend budgets


def bench_args(*flags: str):  # type: ignore[no-untyped-def]
    return parser().parse_args([*SMALL, *CONFIDENT, *flags])


def run_main(main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """A bench's main() on `argv` in this process, as its command line runs it: its exit status and stderr
    (argparse's usage errors exit 2)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def test_the_loop_replay_spends_its_budget_and_refits_the_online_tier_after_every_chunk(
    base_store: Path,  # noqa: F811
) -> None:
    base = ModelStore(base_store).path("annotator", "v0")
    train, test = reviews(240, 1, "train"), reviews(40, 2, "test")
    loop = run_loop(bench_args(), base, train, test, seed=0)
    assert sorted(loop["budgets"]) == [24, 48]
    for b, m in loop["budgets"].items():
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["dataset_accuracy"] <= 1.0
        assert m["items_streamed"] >= b / 0.5 - 40  # the pace line: a budget is spent over the stream, not at once
        assert m["checked"] in (0.0, 1.0)
    full = [r for r in loop["rounds"] if r["regime"] != "head"]
    assert [r["labels"] for r in full] == [12, 24, 48]  # one round at each round point, on exactly its labels
    heads = [r["labels"] for r in loop["rounds"] if r["regime"] == "head"]
    assert heads and heads == sorted(set(heads)) and min(heads) >= 12  # a new head per new label count
    # Each gated round keeps its evidence: the permutation z, and (where the serving version had labels it
    # never saw) the paired counts against it.
    assert all("signal_z" in r for r in loop["rounds"])
    assert any({"fixed", "broken"} <= r.keys() for r in loop["rounds"])

    without = run_loop(bench_args("--no-online-tier"), base, train, test, seed=0)
    assert not [r for r in without["rounds"] if r["regime"] == "head"]

    passive = run_passive(bench_args(), base, train, test, seed=0)
    assert sorted(passive["budgets"]) == [24, 48]
    assert [r["regime"] for r in passive["rounds"]] == ["ungated", "ungated"]
    for b, m in passive["budgets"].items():  # its labelled data set: the items streamed by b labels at --fraction
        assert m["items_streamed"] == b / 0.5 and 0.0 <= m["dataset_accuracy"] <= 1.0
        assert 0.0 <= m["human_label_accuracy"] <= 1.0  # its annotators' share right, as the loop's is recorded


def test_a_loop_whose_stream_ends_short_of_a_budget_reports_where_it_ended(base_store: Path) -> None:  # noqa: F811
    """120 items at half an interaction each cannot buy 500 labels: the budget is not dropped in silence, the
    loop's end point is a round at the labels it reached, measured like a budget, and the summary lists it."""
    from bench.learning import summarise, summarise_end

    base = ModelStore(base_store).path("annotator", "v0")
    train, test = reviews(120, 3, "train"), reviews(40, 4, "test")
    args = parser().parse_args(
        ["--budgets", "24,500", "--early-rounds", "12", "--chunk", "40", "--fraction", "0.5", "--max-length", "32",
         *CONFIDENT, "--no-online-tier"]
    )  # fmt: skip
    loop = run_loop(args, base, train, test, seed=0)
    assert sorted(loop["budgets"]) == [24]
    end = loop["end"]
    assert 24 < end["labels"] <= 60 and end["items_streamed"] == 120
    assert 0.0 <= end["accuracy"] <= 1.0 and 0.0 <= end["dataset_accuracy"] <= 1.0
    assert [r["labels"] for r in loop["rounds"]][-1] == end["labels"]  # a round on exactly the labels reached
    results = {"seeds": [{"seed": 0, "loop": loop}]}
    assert summarise_end(results) == {
        "seeds": [0],
        "labels": [end["labels"]],
        "accuracy": [end["accuracy"]],
        "dataset_accuracy": [end["dataset_accuracy"]],
        "auto_labelled_items": [end["auto_labelled_items"]],
    }
    assert "loop_accuracy" not in summarise(results, [24, 500])["500"]
    # A passive run of earlier code (no labelled data set figure) still merges: the figures it has are summed up.
    results["seeds"][0]["passive"] = {"budgets": {24: {"accuracy": 0.5, "macro_f1": 0.5, "tfidf_accuracy": 0.5}}}
    row = summarise(results, [24, 500])["24"]
    assert row["passive_accuracy"]["n"] == 1 and "passive_dataset_accuracy" not in row
    assert "loop_minus_passive_dataset" not in row and row["loop_minus_passive"]["n"] == 1


def test_top_up_decides_whether_a_confident_loop_spends_a_finite_streams_budget(base_store: Path) -> None:  # noqa: F811
    """--top-up reaches the replay's router. At a review threshold of 0.5 a checked version flags nothing (two
    labels: the top probability is never under it), so from the first checked round on only the top-up buys
    labels: with `never` the loop ends short of 96, with `stream-end` it spends the stream's budget."""
    base = ModelStore(base_store).path("annotator", "v0")
    train, test = reviews(240, 1, "train"), reviews(40, 2, "test")
    flags = ["--budgets", "24,96", "--early-rounds", "12", "--chunk", "40", "--fraction", "0.5", "--max-length", "32",
             "--review-threshold", "0.5", "--no-online-tier"]  # fmt: skip
    never = run_loop(parser().parse_args([*flags, "--top-up", "never"]), base, train, test, seed=0)
    assert never["budgets"][24]["checked"] == 1.0 and 96 not in never["budgets"]
    assert never["end"]["labels"] < 96
    ending = run_loop(parser().parse_args([*flags, "--top-up", "stream-end"]), base, train, test, seed=0)
    assert sorted(ending["budgets"]) == [24, 96] and "end" not in ending
    assert [r["labels"] for r in ending["rounds"]] == [12, 24, 96]


def test_the_dtype_flag_reaches_the_replays_serving_and_training(base_store: Path) -> None:  # noqa: F811
    """bench/learning.py --dtype: the precision the replay serves (and evaluates, refits) in and trains in
    (auto, the default, resolves to the machine's as the services' --dtype does)."""
    import torch

    from bench.learning import Replay, make_configs

    base = ModelStore(base_store).path("annotator", "v0")
    for name, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        cfg, gate = make_configs(bench_args("--dtype", name))
        assert (cfg.eval_dtype, cfg.train_dtype) == (name, name)
        replay = Replay(base, cfg, gate, 0.15, seed=0)
        assert next(replay.infer.encoder.parameters()).dtype == want
        assert next(replay.serving.encoder.parameters()).dtype == torch.float32  # the trained weights stay fp32


def test_the_ungated_twin_trains_the_loops_labels_as_passive_trains_its_own(base_store: Path) -> None:  # noqa: F811
    """--ungated-twin: at each budget a model from the base on the loop's labels, served without the gate as
    the passive baseline's is, scored on the test items beside the loop's serving version; --twin-controls
    adds the loop's items with clean labels and random streamed items; the loop's own run is unchanged by
    them (each twin draws from its own generator), and the items bought are recorded, with or without twins."""
    base = ModelStore(base_store).path("annotator", "v0")
    train, test = reviews(120, 5, "train"), reviews(40, 6, "test")
    flags = ["--budgets", "24", "--early-rounds", "12", "--no-online-tier"]
    plain = run_loop(bench_args(*flags), base, train, test, seed=0)
    twin = run_loop(bench_args(*flags, "--ungated-twin", "--twin-controls"), base, train, test, seed=0)
    assert "ungated_twin_accuracy" not in plain["budgets"][24] and plain["bought"] == twin["bought"]
    for name in ("ungated_twin_accuracy", "ungated_twin_clean_accuracy", "random_twin_accuracy"):
        assert 0.0 <= twin["budgets"][24][name] <= 1.0
    assert twin["budgets"][24]["accuracy"] == plain["budgets"][24]["accuracy"]
    bought = twin["bought"][24]  # the stream indices people labelled, all of them streamed by then
    assert len(bought) == len(set(bought)) == 24 and max(bought) < twin["budgets"][24]["items_streamed"]


def test_the_cold_start_bench_buys_each_strategys_labels_from_the_chunks_streamed(base_store: Path) -> None:  # noqa: F811
    """bench/cold_start.py: every strategy buys its quota from the chunks streamed so far, never an item twice,
    the same items for the same seed; the loop routes as coverage while no head is checked, and once its
    online tier's head passes the gate (the real head round) it buys among the items that head flags."""
    import torch

    from bench.cold_start import STRATEGIES, OnlineTierLoop, bought_labels
    from loopserve.models import encoder_heads
    from trainer.annotation_policy import embed_texts

    base = ModelStore(base_store).path("annotator", "v0")
    model, tokenizer = encoder_heads.load(base), encoder_heads.load_tokenizer(base)
    stream = reviews(160, 7, "train")
    emb = dict(
        zip([e.text for e in stream], embed_texts(model, tokenizer, [e.text for e in stream], 64, 32), strict=True)
    )
    sets = {s: bought_labels(s, stream, 40, 10, model, emb, 0.999, seed=1) for s in STRATEGIES}
    for strategy, by_chunk in sets.items():
        for c, bought in enumerate(by_chunk):
            texts = [e.text for e in bought]
            assert len(set(texts)) == len(texts) <= 10 * (c + 1)
            assert set(texts) <= {e.text for e in stream[: 40 * (c + 1)]}
            if strategy != "loop":
                assert len(bought) == 10 * (c + 1)
        assert bought_labels(strategy, stream, 40, 10, model, emb, 0.999, seed=1) == by_chunk
    assert sets["loop"][0] == sets["coverage"][0]  # nothing checked before the first head round
    # Mechanics, not learning: embeddings that carry the label along one direction, so that a head fitted on
    # a chunk's labels has signal the gate can see (the tiny random encoder's own have little).
    u = torch.nn.functional.normalize(
        torch.randn(next(iter(emb.values())).numel(), generator=torch.Generator().manual_seed(0)), dim=0
    )
    scale = float(torch.stack(list(emb.values())).norm(dim=1).mean())
    emb = {e.text: emb[e.text] + (0.05 * scale if e.label == "great" else -0.05 * scale) * u for e in stream}
    loop = OnlineTierLoop(model, emb, 0.9, audit_fraction=0.0)  # no audit: every pick is a flagged item
    rng, by_text = random.Random(0), {e.text: e for e in stream}
    for c in range(3):
        loop.chunk(stream[c * 40 : (c + 1) * 40], 10, rng, by_text)
        if loop.checked:
            break
    assert loop.checked, "the tiny annotator's head passes the gate on its separable reviews"
    before, nxt = {x.text for x in loop.labelled}, stream[(c + 1) * 40 : (c + 2) * 40]
    probs = loop.probs(nxt)
    flagged = {e.text for e, p in zip(nxt, probs, strict=True) if float(p.max()) < 0.9} | set(loop.backlog)
    loop.chunk(nxt, 10, rng, by_text)
    new = {x.text for x in loop.labelled} - before
    assert new and new <= flagged


def test_the_cold_start_benchs_prototypes_are_label_means_and_fall_back_on_the_descriptions() -> None:
    """bench/cold_start.nearest_prototype: a query goes to the label whose items' mean direction it is
    nearest; with no item of a label, that label's description stands in; a description counted as items
    pulls its prototype towards it."""
    import torch

    from bench.cold_start import nearest_prototype

    descriptions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x, y = torch.tensor([[1.0, 1.0], [2.0, 2.2], [-1.0, 0.1]]), torch.tensor([0, 0, 1])
    queries = torch.tensor([[1.0, 0.9], [-1.0, 0.0], [0.2, 1.0]])
    # label 0's prototype points at (1, 1.05), label 1's at (-1, 0.1): the third query is nearer label 0's
    assert nearest_prototype(x, y, descriptions, 0.0, queries).tolist() == [0, 1, 0]
    # counted as 3 items, label 1's description (0, 1) turns its prototype towards the third query
    assert nearest_prototype(x, y, descriptions, 3.0, queries).tolist() == [0, 1, 1]
    only_zero = nearest_prototype(x[:2], y[:2], descriptions, 0.0, queries)  # label 1: its description alone
    assert only_zero.tolist() == [0, 1, 1]


def test_the_cold_start_benchs_fine_tune_probe_is_paired_with_random(
    base_store: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--fine-tune-at: the replay's recipe fine-tuned from the base on a strategy's labels, scored on the test
    items, with --fine-tune-self-training also self-trained on the items left; the summary pairs it with
    random's (which always runs it) and leaves it out where it did not run."""
    from bench.cold_start import FineTuneProbe, main, summarise

    base = ModelStore(base_store).path("annotator", "v0")
    train, pool, test = reviews(16, 8, "train"), [e.text for e in reviews(24, 10, "pool")], reviews(20, 9, "test")
    plain = FineTuneProbe(base, test, 32, self_training=False)
    assert plain.cfg.pseudo_label_ratio == 0
    row = plain.run(train, pool, seed=0)
    assert 0.0 <= row["fine_tune_accuracy"] <= 1.0 and row["fine_tune_pseudo_labels"] == 0
    row = FineTuneProbe(base, test, 32, self_training=True).run(train, pool, seed=0)
    assert 0.0 <= row["fine_tune_accuracy"] <= 1.0 and row["fine_tune_pseudo_labels"] > 0
    assert plain.load_base() is not plain.base_model  # each training starts from a fresh copy
    row = {"head_accuracy": 0.7, "tfidf_accuracy": 0.6, "majority_share": 0.6, "labels": 10.0}
    runs = {
        s: {10: [{**row, "fine_tune_accuracy": 0.7 + 0.01 * i} for i in range(2)], 20: [row, row]}
        for s in ("coverage", "random", "embedding-coverage", "loop")
    }
    summary = summarise(runs, [10, 20])
    assert summary["coverage"]["10"]["fine_tune_accuracy_minus_random"]["mean"] == 0.0
    assert "fine_tune_accuracy" not in summary["coverage"]["20"]
    code, err = run_main(main, ["--fine-tune-strategies", "coverage,bogus"], capsys)
    assert code == 2 and "--fine-tune-strategies: choose among" in err


def test_the_cold_start_bench_merges_earlier_seeds_and_refuses_other_probes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--seeds 0 --merge A B: the seeds of both files, paired, summarised and plotted with no new run; a file
    measured with another fine-tune probe (here: without self-training) is a usage error, not a mixed mean."""
    import json

    from bench.cold_start import main

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label, "split": e.split}) + "\n"
                            for e in reviews(20, 1, "train") + reviews(10, 2, "test")))  # fmt: skip
    args = {"chunk": 100, "quota": 25, "chunks": 2, "max_length": 128, "fine_tune_at": 50}
    files = []
    for k, self_training in enumerate((True, True, False)):
        row = {"head_accuracy": 0.6 + 0.01 * k, "tfidf_accuracy": 0.6, "majority_share": 0.6, "labels": 25.0}
        runs = {
            s: {"25": [row, row], "50": [{**row, "fine_tune_accuracy": 0.7 + 0.01 * k}] * 2}
            for s in ("coverage", "random", "embedding-coverage", "loop")
        }
        files.append(tmp_path / f"part{k}.json")
        files[-1].write_text(json.dumps({"args": {**args, "fine_tune_self_training": self_training}, "runs": runs}))
    out = tmp_path / "merged.json"
    cmd = ["--dataset", str(data), "--seeds", "0", "--fine-tune-at", "50", "--fine-tune-self-training",
           "--out", str(out), "--merge"]  # fmt: skip
    code, err = run_main(main, [*cmd, *map(str, files[:2])], capsys)
    assert code == 0, err
    merged = json.loads(out.read_text())
    assert len(merged["runs"]["random"]["50"]) == 4 and [m["file"] for m in merged["merged"]] == [
        "part0.json",
        "part1.json",
    ]
    assert abs(merged["summary"]["coverage"]["50"]["fine_tune_accuracy"]["mean"] - 0.705) < 1e-9
    assert [r["head_accuracy"] for r in merged["runs"]["loop"]["25"]] == [0.6, 0.6, 0.61, 0.61]  # files in order
    assert out.with_suffix(".png").stat().st_size > 0
    code, err = run_main(main, [*cmd, *map(str, files[1:])], capsys)
    assert code == 2 and "--merge part2.json: measured with other fine_tune_self_training" in err


def test_passive_draws_from_the_loops_stream_or_the_whole_split() -> None:
    """--passive-from: "stream" buys random items among those the loop's stream has delivered by each budget
    (p / fraction of the split's first items), each budget's purchases extending the last's, the rest of the
    prefix its self-training pool; "train" draws from the whole split, as the baseline always has."""
    from bench.learning import passive_draws

    budgets, fraction = [10, 20, 40], 0.25
    stream = passive_draws("stream", 500, budgets, fraction, random.Random(3))
    whole = passive_draws("train", 500, budgets, fraction, random.Random(3))
    for p in budgets:
        assert sorted(stream[p]) == list(range(int(p / fraction)))  # exactly the streamed prefix, once each
        assert len(whole[p]) == int(p / fraction) == len(set(whole[p]))
    assert stream[20][:10] == stream[10][:10] and stream[40][:20] == stream[20][:20]
    assert whole[40][:20] == whole[20][:20]
    assert max(whole[40][:40]) >= 160  # the whole split: not confined to the stream's first items
    assert stream != passive_draws("stream", 500, budgets, fraction, random.Random(4))


def test_the_learning_benchs_merge_refuses_a_file_measured_with_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--seeds 0 --merge A B: a loop file and a passive file of the same settings merge into one paired
    summary; a file whose learner ran with other settings (passive drawn from elsewhere, the loop routed
    otherwise) is a usage error naming them, not a mixed mean. A setting of a learner not taken from the file
    (the other learner's, or one a later file replaces) does not count."""
    import json

    from bench.learning import main

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label, "split": e.split}) + "\n"
                            for e in reviews(20, 1, "train") + reviews(10, 2, "test")))  # fmt: skip
    flags = ["--dataset", str(data), "--budgets", "24", "--dtype", "float32", "--passive-from", "stream"]

    def result(name: str, learners: str, accuracy: float, *extra: str) -> str:
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(parser().parse_args([*flags, *extra])).items()}
        figures = {"accuracy": accuracy, "macro_f1": accuracy, "dataset_accuracy": accuracy}
        seed = {"seed": 0, **{k: {"budgets": {"24": figures}, "rounds": []} for k in learners.split(",")}}
        (tmp_path / name).write_text(json.dumps({"args": args, "seeds": [seed]}))
        return str(tmp_path / name)

    loop, passive = result("loop.json", "loop", 0.7), result("passive.json", "passive", 0.6, "--top-up", "always")
    out = tmp_path / "merged.json"
    cmd = [*flags, "--seeds", "0", "--out", str(out), "--merge"]
    code, err = run_main(main, [*cmd, loop, passive], capsys)
    assert code == 0, err
    row = json.loads(out.read_text())["summary"]["24"]
    assert abs(row["loop_minus_passive"]["mean"] - 0.1) < 1e-9 and row["loop_minus_passive"]["n"] == 1
    assert out.with_suffix(".png").stat().st_size > 0
    whole_split = result("whole-split.json", "passive", 0.6, "--passive-from", "train")
    code, err = run_main(main, [*cmd, loop, whole_split], capsys)
    assert code == 2 and "--merge whole-split.json: measured with other passive_from" in err
    routed = result("routed.json", "loop", 0.7, "--top-up", "always")
    code, err = run_main(main, [*cmd, routed, passive], capsys)
    assert code == 2 and "--merge routed.json: measured with other top_up" in err
    # A file's learner that a later file replaces is not taken from it, and its settings do not count.
    both = result("both.json", "loop,passive", 0.7, "--passive-from", "train")
    code, err = run_main(main, [*cmd, both, passive], capsys)
    assert code == 0, err
    assert abs(json.loads(out.read_text())["summary"]["24"]["loop_minus_passive"]["mean"] - 0.1) < 1e-9
    code, err = run_main(main, [*cmd, passive, both], capsys)
    assert code == 2 and "--merge both.json: measured with other passive_from" in err


def test_shared_annotators_give_passive_the_loops_people_and_slips() -> None:
    """--annotators shared: the n-th label passive buys comes from the person who gave the loop its n-th, with
    the same slip or none (common random numbers); independent: passive's own pool, as before."""
    from bench.learning import annotator_pool

    labels = ["great", "other"]
    loop_gold = [random.Random(1).choice(labels) for _ in range(400)]  # each learner buys its own items
    passive_gold = [random.Random(2).choice(labels) for _ in range(400)]

    def slips(annotators: str, learner: str, gold: list[str]) -> list[int]:
        pool = annotator_pool(bench_args("--annotators", annotators, "--error-rate", "0.2"), labels, 3, learner)
        return [i for i, y in enumerate(gold) if pool.noisy_label(y) != y]

    loop = slips("shared", "loop", loop_gold)
    assert 40 < len(loop) < 120  # about 20% of 400
    assert slips("independent", "loop", loop_gold) == loop  # the flag leaves the loop's people as they were
    assert slips("shared", "passive", passive_gold) == loop  # other items, the same slips at the same places
    assert slips("independent", "passive", passive_gold) != loop
