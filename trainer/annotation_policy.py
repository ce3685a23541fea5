"""Annotation policy: supervised learning on human-verified labels plus off-policy bandit feedback.

The annotator (loopserve.models.encoder_heads.AnnotatorModel) gives pi_theta(a | x) = softmax(logits / T).
Two kinds of feedback train it:

- Corrections and accepted labels are ground truth: cross-entropy  -log pi_theta(y | x).
  They live in a replay buffer of every human-verified label (not only this round's), so a round of
  new corrections does not make the model forget what it learnt from older ones.
- A rejected label a is bandit feedback: reward r = 0 for the action the logging policy pi_0 chose,
  with no word on what the right label is. REINFORCE with a baseline b, importance-weighted because the
  action came from the serving version pi_0, not from pi_theta (Williams, 1992; off-policy policy
  gradient as in Degris et al., 2012):
      w = pi_theta(a | x) / pi_0(a | x)        (pi_0(a | x): the propensity logged with the decision)
      loss = -clip(w, max=c) * (r - b) * log pi_theta(a | x)
  w is treated as a constant (the gradient of E_{pi_0}[w r] is E_{pi_0}[w r grad log pi_theta]);
  clipping bounds the variance when pi_0 gave the action a small probability. b is the running share of
  accepted labels among accepts and rejects, so a reject (r = 0 < b) pushes pi_theta(a | x) down, and
  it pushes less the lower pi_theta(a | x) already is (w shrinks with it).

Why full fine-tuning (encoder and head): on the Fine Food task a head on frozen MiniLM features caps
at ~0.78 accuracy while the fine-tuned encoder reaches ~0.85 (DESIGN.md), and the judged ceiling is
the fine-tuned one. Hence lr ~3e-5 for the pretrained encoder (larger steps wipe out pre-training),
1e-3 for the head (it starts far from its optimum), batch 16 and 256 tokens (the recipe that reached
0.85 there; reviews are ~64 tokens, so 256 truncates almost nothing).

With tens of labels, two things from SetFit (Tunstall et al., 2022) help: a pair loss beside the
cross-entropy that pulls the embeddings of same-label items together and pushes different labels
apart (every pair within a batch, so 16 items give 120 comparisons), and a head refitted on the trained
encoder's embeddings once the steps are done (`contrastive_coef`, `head_refit`: figures there).

Evaluation on a held-out slice of human-verified items: accuracy, macro-F1, expected calibration error
(Guo et al., 2017, equal-width bins over the top probability) and NLL. Temperature scaling (Guo et al.)
then fits one scalar T' on that slice by minimising NLL with LBFGS; the served temperature becomes
T * T', written to head.json, so that `needs_review` thresholds are probabilities.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from loopserve.device import pick_dtype
from loopserve.models.encoder_heads import AnnotatorModel
from loopserve.models.micro_batches import padded_groups, token_budget
from trainer.examples import BanditExample, LabelExample
from trainer.gate import LossGuard
from trainer.head_fit import fit_head
from trainer.optim import encoder_optimizer


@dataclass
class AnnotationPolicyConfig:
    encoder_lr: float = 3e-5
    """AdamW learning rate of the MiniLM encoder (full fine-tuning; see the module docstring)."""
    head_lr: float = 1e-3
    """Learning rate of the label head."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm)."""
    batch_size: int = 16
    """Items per optimizer step (verified labels and rejects mixed)."""
    max_length: int = 256
    """Tokens per item; longer items are truncated."""
    epochs: float = 1.0
    """Passes over the replay buffer (and the rejects) per round; 0 scales them with the data
    (`auto_epochs`: many passes over a few dozen labels, fewer over hundreds)."""
    max_steps: int = 0
    """Cap on optimizer steps per round; 0 means no cap."""
    class_balance: bool = False
    """Weigh each verified label's cross-entropy by n / (L * n_label), so every label counts alike in the
    round whatever its share of the buffer (bandit rows keep weight 1)."""
    warmup_ratio: float = 0.0
    """Share of a round's steps over which the learning rates ramp up from 0 (then they stay flat)."""
    decay_ratio: float = 0.0
    """Share of a round's steps, its last, over which the learning rates fall linearly towards 0. Both 0 (the
    default) keep the rates flat. Why flat: warmup 0.1 and decay 0.3, against flat rates on the same labels
    and batch orders from the base (`bench/recipe.py`, Fine Food, 2 label draws x 3 shuffles), steadied
    the rounds at 500 labels (sd 0.004 against 0.014; mean +0.006 +- 0.005) but cost 0.010 +- 0.004 at
    300; the loop's curve with cross-fitted rounds up to 600 labels (gate.cv_max_items) was measured flat."""
    contrastive_coef: float = 1.0
    """Weight of a SetFit-style pair loss beside the cross-entropy: over every pair of verified labels in a
    batch, (cos(e_i, e_j) - [y_i = y_j])^2 on the encoder's normalised embeddings (sentence-transformers'
    CosineSimilarityLoss, which SetFit trains on pairs drawn from a few labels); 0 turns it off. A batch
    of 16 gives 120 pairs at no extra encoder pass, so it shapes the embedding space that the head (and
    the online tier's head) read with far more comparisons than there are labels. Measured with
    `head_refit` (bench/learning.py, passive random sampling, Fine Food, 7 seeds, same labels and batch
    orders): see `head_refit`."""
    head_refit: bool = True
    """After the round's steps, refit the head on the trained encoder's embeddings of the round's verified
    labels (regularised logistic regression towards the trained head, trainer.head_fit: SetFit's second
    stage), so the head fits the encoder as it ended rather than as it moved. With `contrastive_coef` 1,
    against neither (passive random sampling, Fine Food, 7 seeds, paired): +0.015 +- 0.007 test accuracy
    at 50 labels and +0.014 +- 0.004 at 100, no seed worse (0.738 and 0.763 against 0.723 and 0.749).
    Fitting the head on frozen embeddings *before* fine-tuning (LP-FT) measured nothing (4 seeds: +0.002
    at 50, -0.008 at 100) and is not done."""
    head_refit_l2: float = 1e-2
    """`head_refit`: lambda of the pull towards the trained head (trainer.head_fit; the online tier's default)."""
    head_refit_iters: int = 100
    """`head_refit`: LBFGS iterations."""
    early_stopping: bool = False
    """Cross-fitted rounds (few labels) pick how long the candidate trains from the fold models: each fold
    model is scored out of fold at `STOP_FRACTIONS` of its schedule (its head refitted there, as the end of a
    round would), and the candidate trains for the fraction of its own schedule whose out-of-fold logits
    have the least calibrated cross-entropy over all folds (early stopping on the cross-validated metric;
    it never trains longer than the schedule). The gate still judges the full schedule's out-of-fold
    answers, so its permutation test stays exact; the temperature is fitted on the chosen fraction's.
    Off: the loop with it, paired against the loop without (bench/learning.py, Fine Food, 7 seeds), read
    +0.008 +- 0.009 at 50 labels and +0.001 +- 0.012 at 100
    (bench/results/learning-small-budgets-early-stopping.json), -0.010 +- 0.008 at 200 and +0.003 +- 0.007
    at 300 (3 seeds, learning-early-stopping-to-300.json), though it chose a quarter to three quarters of
    the schedule in 9 of 15 rounds: the fold models' calibrated cross-entropy is too noisy a guide at these
    sizes to beat the auto-scaled schedule. Those runs had no self-training, which it needs off
    (`pseudo_label_ratio` 0): it picks the schedule of fold models that self-training replaces."""
    pseudo_label_ratio: float = 1.5
    """Self-training (trainer.pseudo_labels): pseudo-labels per human label (at most `pseudo_label_max`);
    0 turns it off. While labels are few (cross-fitted rounds) every fold model and the candidate teach a
    student from the base (`self_train`: the teacher's confident labels on the pooled items nobody
    labelled, in the human labels' class shares), so the gate's evidence is the self-trained recipe's.
    On by default, by measurement (Fine Food, seeds 0-2, paired with the same seeds without it):
    the loop (bench/results/learning-self-training-to-300.json) reads 0.817 +- 0.001 at 300 labels
    against 0.799 +- 0.004, +0.019 +- 0.006 paired (+0.011, +0.030, +0.015), and +0.020, +0.000, +0.020 on
    average at 50, 100 and 200; a round from the base on random labels (bench/recipe.py,
    recipe-self-training.json) +0.013 +- 0.007 at 100 labels and +0.011 +- 0.003 at 300, all 6 pairs
    positive. A few-labels round costs about twice the time (the two stages)."""
    heldout_self_training: bool = False
    """Self-training in held-out rounds too (many labels): the checked serving version labels the pool and
    the round trains on with those (`pseudo_label_ratio` of them). Off: paired against the same round
    without it (bench/learning.py --pseudo-ablation, Fine Food, 3 seeds, an earlier recipe), it moved test
    accuracy by -0.002 +- 0.014 for the loop at 300 labels and +0.000 / +0.003 for passive at 300 / 500,
    and it costs each round a pass over up to `pseudo_pool_max` items and up to `pseudo_label_max` more
    training items: the default demo's first three held-out rounds took 43, 61 and 69 s with it, 37, 29
    and 44 s without (two runs of this code, same seed, 2-core AMD EPYC)."""
    pseudo_label_max: int = 600
    """Cap on pseudo-labels per round (each one costs a training step's share, like a human label)."""
    pseudo_pool_max: int = 2000
    """Unlabelled items (the most recent) the serving version scores for them; 0: all the trainer holds."""
    bandit_coef: float = 1.0
    """Weight of the REINFORCE term for rejects relative to the cross-entropy."""
    max_importance_weight: float = 5.0
    """c in clip(pi_theta / pi_0, max=c)."""
    min_propensity: float = 0.01
    """Propensities are floored at this before dividing (a logged 0 would give an infinite weight)."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    eval_batch_size: int = 64
    """Items per forward pass in evaluation."""
    eval_dtype: str = "auto"
    """auto | float32 | bfloat16: the encoder's precision in every forward pass outside training (the gate's
    evaluations, the calibration, the head refit, the online tier's embeddings), as the services serve it
    (set it to the policy service's --dtype; auto is that flag's default rule: bf16 on CUDA and on a CPU with
    native bf16, else fp32).
    bf16 runs under autocast: the head is refitted and judged on the embeddings it is applied to, and on
    a 2-core AMD EPYC with avx512_bf16 it embeds Fine Food reviews 3.1x as fast as fp32 (73.9 against
    23.6 reviews/s, one thread; minimum cosine to fp32's embeddings 0.99997), which every round pays for
    every label it refits on."""
    train_dtype: str = "float32"
    """float32 | bfloat16 | auto: the precision of the training steps' forward passes. bf16 is mixed
    precision (autocast): the weights, the optimizer's state, the head and the losses stay fp32. Measured
    (bench/results/learning-small-budgets-bf16-train.json, passive random sampling on Fine Food, 7 seeds,
    50 and 100 labels, the same labels and batch orders as the fp32 run): test accuracy within 0.002 of
    fp32's at all 14 points (mean -0.0004), rounds in half the time on a 2-core AMD EPYC with avx512_bf16
    (37.8 s against 72.7 s at 100 labels, seed 0). Default fp32: a CPU without bf16 units runs it slower."""
    ece_bins: int = 15
    """Equal-width confidence bins for the expected calibration error."""

    def __post_init__(self) -> None:
        for name in (self.eval_dtype, self.train_dtype):
            pick_dtype(name, torch.device("cpu"))  # an unknown name fails here, not mid-round
        if self.early_stopping and self.pseudo_label_ratio > 0:
            # Early stopping picks the schedule of the fold models that self-training replaces by students.
            raise ValueError(
                "annotator early_stopping needs pseudo_label_ratio 0 (--annotator.pseudo-label-ratio 0): it picks the"
                " schedule of fold models that self-training replaces by students"
            )
        w, d = self.warmup_ratio, self.decay_ratio
        if not (0.0 <= w <= 1.0 and 0.0 <= d <= 1.0 and w + d <= 1.0):
            raise ValueError(
                f"annotator warmup_ratio {w:g} and decay_ratio {d:g} must be in [0, 1] and add up to at most 1"
            )


def auto_epochs(n: int) -> float:
    """Passes over n labels when `epochs` is 0: 8 * sqrt(50 / n), but at least 800 / n (800 label
    presentations, 50 steps of 16), within [1, 8]. So 8 passes up to 100 labels, 800 / n from there to 200,
    the square root beyond.

    Small-data fine-tuning needs many passes (SetFit and the few-shot fine-tuning literature train
    tens of labels for 10+ epochs), while hundreds of labels overfit with as many; the square root keeps
    the optimizer steps growing with the data (n=50: 32 steps of 16, n=300: 62, n=1000: 112) without
    the cost of a round growing linearly. The floor: the square root alone gave 100 labels 5.66 passes, 40
    steps, barely more than 50 labels' 32, and passive random sampling on Fine Food read 0.735 +- 0.023 at
    100 labels with it against 0.755 +- 0.017 with 8 passes (7 seeds, paired +0.019 +- 0.009); at 150, 5.33
    passes against 4.62 read the same (0.774 against 0.773, paired +0.001 +- 0.003). Above 200 labels the
    rule is the one every earlier figure was measured with."""
    return min(8.0, max(1.0, 800.0 / max(n, 1), 8.0 * math.sqrt(50.0 / max(n, 1))))


def round_steps(n_items: int, cfg: AnnotationPolicyConfig) -> int:
    """Optimizer steps for a round over n_items (epochs, or auto_epochs when cfg.epochs is 0; max_steps caps)."""
    epochs = cfg.epochs or auto_epochs(n_items)
    steps = max(1, math.ceil(epochs * math.ceil(n_items / cfg.batch_size)))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def make_optimizer(model: AnnotatorModel, cfg: AnnotationPolicyConfig) -> torch.optim.Optimizer:
    return encoder_optimizer(model, cfg.encoder_lr, cfg.head_lr, cfg.weight_decay)


def lr_factor(step: int, steps: int, cfg: AnnotationPolicyConfig) -> float:
    """The multiplier of every group's learning rate at `step` (0-based) of a round of `steps`: a linear
    warmup over the first `warmup_ratio` of the steps, flat, a linear decay over the last `decay_ratio`
    (a trapezoid; the warmup-stable-decay schedule)."""
    warmup = round(cfg.warmup_ratio * steps)
    decay = round(cfg.decay_ratio * steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= steps - decay:
        return (steps - step) / (decay + 1)
    return 1.0


@contextlib.contextmanager
def _round_rates(optimizer: torch.optim.Optimizer) -> Iterator[list[float]]:
    """The groups' configured rates, put back when the round ends however it ends: the schedule scales them
    for one round, and the optimizer (kept across held-out rounds, checkpointed) holds them between."""
    base = [group["lr"] for group in optimizer.param_groups]
    try:
        yield base
    finally:
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr


@contextlib.contextmanager
def _dropout_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Dropout draws from torch's global generator, so before this two rounds on the same labels and batch
    order still differed mask by mask, and a bench run could not be repeated (the same seed gave passive
    sampling 0.739 and 0.756 at 50 labels in two runs). With the round's `generator` given, the global
    generator is seeded from it for the round and restored after: the round repeats with its batch order
    and two recipes compared on one generator seed are paired down to the masks."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


def label_tensor(model: AnnotatorModel, items: Sequence[LabelExample]) -> torch.Tensor:
    """(N,) the index of each item's label in the model's label set."""
    index = {name: i for i, name in enumerate(model.spec.label_names)}
    return torch.tensor([index[x.label] for x in items], dtype=torch.long)


def batch_embeddings(
    model: AnnotatorModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> torch.Tensor:
    """The encoder's L2-normalised mean-pooled embeddings: (B, C)."""
    device = next(model.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
    return model.embed(**batch)  # (B, C)


@torch.no_grad()
def embed_texts(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, C) float32 embeddings of `texts` on the CPU, in eval mode; the forward passes under bf16 autocast
    when `dtype` is bfloat16 (`AnnotationPolicyConfig.eval_dtype`). The texts are sorted by length and cut
    as the services cut theirs (loopserve.models.micro_batches: at most `batch_size` a forward, and on a CPU
    at most 512 padded tokens), so a short review does not pay for the longest one's padding."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(texts), model.head.in_features)
    if not texts:
        return out
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)  # unpadded ids, one list a text
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for idx, batch in padded_groups(tokenizer, enc, token_budget(0, device.type), batch_size):
            out[idx] = model.embed(**batch.to(device)).float().cpu()  # (b, C)
    return out


def eval_dtype(model: AnnotatorModel, cfg: AnnotationPolicyConfig) -> torch.dtype:
    """The precision `cfg.eval_dtype` names on the device `model` is on."""
    return pick_dtype(cfg.eval_dtype, next(model.parameters()).device)


def pair_cosine_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """emb (B, C) L2-normalised, labels (B,): mean over the B(B-1)/2 pairs of (cos - [same label])^2; 0 for
    fewer than two rows."""
    if emb.shape[0] < 2:
        return emb.sum() * 0.0
    e = emb.float()
    i, j = torch.triu_indices(e.shape[0], e.shape[0], 1, device=e.device)
    target = (labels[i] == labels[j]).float()
    return ((e[i] * e[j]).sum(-1) - target).pow(2).mean()


@torch.no_grad()
def refit_head(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    labelled: Sequence[LabelExample],
    cfg: AnnotationPolicyConfig,
) -> None:
    """`head_refit`: the head becomes the regularised logistic regression of the labels on the encoder's
    embeddings, pulled towards the head as trained. The model divides the head's logits by its
    temperature, so the fit is made on that scale and stored multiplied back."""
    texts = [x.text for x in labelled]
    emb = embed_texts(model, tokenizer, texts, cfg.eval_batch_size, cfg.max_length, eval_dtype(model, cfg))  # (N, C)
    w, b = refitted_head(model, emb, labelled, cfg)
    t = model.spec.temperature
    model.head.weight.copy_(w * t)
    model.head.bias.copy_(b * t)


@torch.no_grad()
def refitted_head(
    model: AnnotatorModel, emb: torch.Tensor, labelled: Sequence[LabelExample], cfg: AnnotationPolicyConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`refit_head`'s fit on the embeddings `emb` (N, C) of `labelled`, on the scale of the served logits
    (the head divided by the temperature): (W (L, C), b (L,)), the model left as it is."""
    t = model.spec.temperature
    w0, b0 = model.head.weight.float().cpu() / t, model.head.bias.float().cpu() / t
    with torch.enable_grad():
        return fit_head(
            emb, label_tensor(model, labelled), w0, b0, l2=cfg.head_refit_l2, max_iter=cfg.head_refit_iters,
            class_weight=_label_weights(labelled, model.spec.label_names, cfg),
        )  # fmt: skip


def annotation_loss(
    logits: torch.Tensor,
    is_bandit: torch.Tensor,
    actions: torch.Tensor,
    propensity: torch.Tensor,
    baseline: float,
    cfg: AnnotationPolicyConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item losses for a mixed batch.

    logits (B, L); is_bandit (B,) bool; actions (B,) the verified label (supervised rows) or the
    rejected label (bandit rows); propensity (B,) pi_0(a|x) on bandit rows.
    Returns (loss (B,), cross-entropy (B,) on supervised rows, importance weights (B,) on bandit rows).
    """
    logp = F.log_softmax(logits, dim=-1)  # (B, L)
    logp_a = logp.gather(1, actions[:, None]).squeeze(1)  # (B,)
    ce = -logp_a  # supervised rows: -log pi(y|x)
    w = (logp_a.detach().exp() / propensity.clamp(min=cfg.min_propensity)).clamp(max=cfg.max_importance_weight)
    r = torch.zeros_like(logp_a)  # a rejected label earns reward 0
    pg = -w * (r - baseline) * logp_a  # bandit rows: REINFORCE with baseline, importance-weighted
    loss = torch.where(is_bandit, cfg.bandit_coef * pg, ce)  # (B,)
    return loss, ce, w


def train_annotation_policy(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    labelled: Sequence[LabelExample],
    rejects: Sequence[BanditExample],
    cfg: AnnotationPolicyConfig,
    *,
    baseline: float = 0.5,
    optimizer: torch.optim.Optimizer | None = None,
    guard: LossGuard | None = None,
    generator: torch.Generator | None = None,
    schedule_fraction: float = 1.0,
    at_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train in place on the replay buffer `labelled` and the bandit examples `rejects`.

    Labels outside the model's label set must have been filtered out by the caller (the consumer
    counts them as skipped). Batches are drawn without replacement and grouped by length within a
    window of batches, so that a long review does not make fifteen short ones pay for its padding.
    `schedule_fraction`: train for that share of the round's steps (early stopping's choice, at least one
    step); `at_step(done)`: called after every step with the steps done so far, the model in eval mode
    (training resumes after it), before the end-of-round head refit."""
    index = {name: i for i, name in enumerate(model.spec.label_names)}
    items: list[LabelExample | BanditExample] = [*labelled, *rejects]
    if not items:
        return {"steps": 0.0}
    optimizer = optimizer or make_optimizer(model, cfg)
    guard = guard or LossGuard("annotator")
    steps = max(1, round(schedule_fraction * round_steps(len(items), cfg)))
    label_weight = _label_weights(labelled, model.spec.label_names, cfg)  # (L,)
    model.train()
    device = next(model.parameters()).device
    mixed = pick_dtype(cfg.train_dtype, device) == torch.bfloat16
    order: list[list[int]] = []
    totals = {"loss": 0.0, "ce": 0.0, "importance_weight": 0.0}
    n_ce = n_bandit = 0
    with _round_rates(optimizer) as base_lrs, _dropout_rng(generator):
        for step in range(steps):
            if not order:  # a new pass: shuffle, group by length within windows of 8 batches, shuffle the batches
                perm = torch.randperm(len(items), generator=generator).tolist()
                window = cfg.batch_size * 8
                grouped = [
                    sorted(perm[i : i + window], key=lambda j: len(items[j].text)) for i in range(0, len(perm), window)
                ]
                batches = [g[i : i + cfg.batch_size] for g in grouped for i in range(0, len(g), cfg.batch_size)]
                order = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
            batch_ids = order.pop(0)
            batch = [items[j] for j in batch_ids]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                emb = batch_embeddings(model, tokenizer, [x.text for x in batch], cfg.max_length).float()  # (B, C)
            logits = model.logits_of(emb)  # (B, L), the head in fp32
            is_bandit = torch.tensor([isinstance(x, BanditExample) for x in batch], device=logits.device)  # (B,)
            actions = torch.tensor([index[x.label] for x in batch], device=logits.device)  # (B,)
            propensity = torch.tensor(
                [x.propensity if isinstance(x, BanditExample) else 1.0 for x in batch],
                dtype=logits.dtype,
                device=logits.device,
            )  # (B,)
            per_item, ce, w = annotation_loss(logits, is_bandit, actions, propensity, baseline, cfg)
            if label_weight is not None:
                per_item = torch.where(is_bandit, per_item, per_item * label_weight.to(logits.device)[actions])
            loss = per_item.mean()
            if cfg.contrastive_coef > 0:
                loss = loss + cfg.contrastive_coef * pair_cosine_loss(emb[~is_bandit], actions[~is_bandit])
            guard.check(step, loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            factor = lr_factor(step, steps, cfg)
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
            optimizer.step()
            totals["loss"] += loss.item()
            totals["ce"] += ce[~is_bandit].sum().item()
            totals["importance_weight"] += w[is_bandit].sum().item()
            n_ce += int((~is_bandit).sum())
            n_bandit += int(is_bandit.sum())
            if at_step is not None:
                at_step(step + 1)
                model.train()
    model.eval()
    if cfg.head_refit and labelled:
        refit_head(model, tokenizer, labelled, cfg)
    return {
        "loss": totals["loss"] / steps,
        "ce": totals["ce"] / max(n_ce, 1),
        "importance_weight": totals["importance_weight"] / max(n_bandit, 1),
        "steps": float(steps),
    }


def _label_weights(
    labelled: Sequence[LabelExample], names: Sequence[str], cfg: AnnotationPolicyConfig
) -> torch.Tensor | None:
    """(L,) `class_balance` weights n / (L * n_label) of the verified labels (a label absent: 0, unused);
    None when balancing is off or there is nothing to balance."""
    if not cfg.class_balance or not labelled:
        return None
    counts = torch.bincount(torch.tensor([names.index(x.label) for x in labelled]), minlength=len(names)).float()
    present = counts > 0
    weights = torch.zeros(len(names))
    weights[present] = len(labelled) / (int(present.sum()) * counts[present])
    return weights


@torch.no_grad()
def predict_logits(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: AnnotationPolicyConfig,
) -> torch.Tensor:
    """(N, L) served logits, in eval mode, batched."""
    emb = embed_texts(model, tokenizer, texts, cfg.eval_batch_size, cfg.max_length, eval_dtype(model, cfg))  # (N, C)
    with torch.no_grad():
        return model.logits_of(emb.to(next(model.parameters()).device)).float().cpu()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """probs (N, L), labels (N,): sum over bins of |accuracy - confidence| weighted by the bin's share."""
    conf, pred = probs.max(dim=-1)  # (N,), (N,)
    correct = (pred == labels).float()  # (N,)
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges.tolist()):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(correct[in_bin].mean().item() - conf[in_bin].mean().item())
    return ece


def macro_f1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean of per-label F1 over the labels that occur in `labels` or `pred`."""
    f1s = []
    for c in torch.unique(torch.cat([pred, labels])).tolist():
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(f1s) / len(f1s) if f1s else float("nan")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """logits (N, L), labels (N,) -> accuracy, macro_f1, ece, nll, n, majority_rate."""
    n = labels.numel()
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "macro_f1": nan, "ece": nan, "nll": nan, "n": 0.0, "majority_rate": nan}
    pred = logits.argmax(dim=-1)  # (N,)
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "macro_f1": macro_f1(pred, labels),
        "ece": expected_calibration_error(logits.softmax(dim=-1), labels, bins),
        "nll": F.cross_entropy(logits, labels).item(),
        "n": float(n),
        "majority_rate": torch.bincount(labels).max().item() / n,
    }


def evaluate_annotation_policy(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LabelExample],
    cfg: AnnotationPolicyConfig,
) -> dict[str, float]:
    """Held-out metrics of the model as it would be served (with its current temperature)."""
    return evaluate_with_correct(model, tokenizer, items, cfg)[0]


def evaluate_with_correct(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LabelExample],
    cfg: AnnotationPolicyConfig,
) -> tuple[dict[str, float], torch.Tensor]:
    """(held-out metrics, which items the top label got right: (N,) bool), for paired comparisons."""
    labels = label_tensor(model, items)  # (N,)
    logits = predict_logits(model, tokenizer, [x.text for x in items], cfg)  # (N, L)
    return classification_metrics(logits, labels, cfg.ece_bins), logits.argmax(-1) == labels


T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """argmin_T NLL(softmax(logits / T), labels) by LBFGS over log T (keeps T > 0), clamped to
    [T_MIN, T_MAX]; 1.0 with no data. logits (N, L), labels (N,)."""
    if labels.numel() == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.exp().item())
    # A slice with no errors sends the MLE to T -> 0 (certainty); the clamp keeps a finite scale.
    return min(max(t, T_MIN), T_MAX) if math.isfinite(t) else 1.0


def calibrate(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LabelExample],
    cfg: AnnotationPolicyConfig,
) -> float:
    """Fit T' on `items` and fold it into the model's temperature (head.json on save); returns the new T."""
    labels = label_tensor(model, items)  # (N,)
    logits = predict_logits(model, tokenizer, [x.text for x in items], cfg)  # already / T
    model.spec.temperature = model.spec.temperature * fit_temperature(logits, labels)
    return model.spec.temperature


# ---- small-data rounds: train from the zero-shot base, judge by cross-fitting ---------------------


def fold_of(text: str, k: int) -> int:
    """Stable fold by content (as `heldout`): an item keeps its fold from round to round."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return h % k


STOP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
"""Where early stopping (`AnnotationPolicyConfig.early_stopping`) scores the fold models: shares of a schedule."""


@dataclass
class CrossFit:
    logits: torch.Tensor
    """(N, L) out-of-fold logits, each fold model at the end of its schedule: the gate's evidence."""
    at_fraction: dict[float, torch.Tensor]
    """`early_stopping`: (N, L) out-of-fold logits at each of STOP_FRACTIONS of the schedules; else empty."""


def schedule_marks(steps: int) -> dict[int, list[float]]:
    """The step after which each of STOP_FRACTIONS of a schedule of `steps` ends (as `train_annotation_policy`
    rounds a `schedule_fraction`), fractions that round to the same step together."""
    marks: dict[int, list[float]] = {}
    for q in STOP_FRACTIONS:
        marks.setdefault(max(1, round(q * steps)), []).append(q)
    return marks


def cross_fit_logits(
    load_base: Callable[[], AnnotatorModel],
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LabelExample],
    cfg: AnnotationPolicyConfig,
    *,
    folds: int,
    n_labels: int,
    generator: torch.Generator | None = None,
    guard: LossGuard | None = None,
    refine: Callable[[AnnotatorModel, Sequence[LabelExample]], AnnotatorModel] | None = None,
) -> CrossFit:
    """Out-of-fold logits (N, L): for each of `folds` folds, a model trained from the base on the other
    folds (the round's recipe, steps scaled to their size) predicts the items of this fold; with
    `early_stopping`, also at STOP_FRACTIONS of its schedule (the head refitted there on the fold model's
    training labels, as the end of its round would; scoring never touches the training's random state, so
    the schedule's end is the same either way).

    This is the evidence the gate and the calibration use while labels are few: every verified label is
    both trained on (by the candidate) and judged on (out of fold), so none is spent on a held-out
    slice. It estimates the recipe's accuracy at (folds - 1) / folds of the data, a little pessimistic
    for the candidate trained on all of it. Costs (folds - 1) rounds' worth of steps.

    `refine(model, train)`: what the recipe does with a fold model before it predicts (self-training:
    trainer.pseudo_labels.self_train); it must not read the fold's labels."""
    out = torch.zeros(len(items), n_labels)
    at = {q: torch.zeros(len(items), n_labels) for q in STOP_FRACTIONS} if cfg.early_stopping else {}
    fold_ids = [fold_of(x.text, folds) for x in items]
    for f in range(folds):
        train = [x for x, g in zip(items, fold_ids, strict=True) if g != f]
        test_idx = [i for i, g in enumerate(fold_ids) if g == f]
        if not test_idx:
            continue
        test_texts = [items[i].text for i in test_idx]
        model = load_base()
        steps = round_steps(len(train), cfg)
        # The schedule's end is scored below as the evidence itself: only the marks before it are scored here.
        marks = {s: qs for s, qs in schedule_marks(steps).items() if s < steps} if at and train else {}
        scored: dict[float, torch.Tensor] = {}  # fraction -> (m, L) this fold's logits there
        if train:
            train_annotation_policy(
                model, tokenizer, train, [], cfg, guard=guard, generator=generator,
                at_step=_stop_scorer(model, tokenizer, train, test_texts, cfg, marks, scored) if marks else None,
            )  # fmt: skip
            if refine is not None:
                model = refine(model, train)
        out[test_idx] = predict_logits(model, tokenizer, test_texts, cfg)
        for q in at:  # the fractions ending with the schedule (or with no other fold to train on): its answers
            at[q][test_idx] = scored.get(q, out[test_idx])
    return CrossFit(out, at)


def _stop_scorer(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[LabelExample],
    test_texts: Sequence[str],
    cfg: AnnotationPolicyConfig,
    marks: dict[int, list[float]],
    out: dict[float, torch.Tensor],
) -> Callable[[int], None]:
    """`train_annotation_policy`'s `at_step` for a fold model: at each mark, its logits on its fold's
    `test_texts` with the head refitted on `train` (`head_refit`) or as trained, stored in `out[q]` for
    every fraction q ending there."""

    def score(done: int) -> None:
        if done not in marks:
            return
        if cfg.head_refit:
            dtype = eval_dtype(model, cfg)
            emb = embed_texts(model, tokenizer, test_texts, cfg.eval_batch_size, cfg.max_length, dtype)  # (m, C)
            texts = [x.text for x in train]
            train_emb = embed_texts(model, tokenizer, texts, cfg.eval_batch_size, cfg.max_length, dtype)
            w, b = refitted_head(model, train_emb, train, cfg)
            logits = emb @ w.T + b
        else:
            logits = predict_logits(model, tokenizer, test_texts, cfg)
        for q in marks[done]:
            out[q] = logits

    return score


def pick_stop(at_fraction: dict[float, torch.Tensor], labels: torch.Tensor) -> tuple[float, dict[float, float]]:
    """Early stopping's choice: the fraction of the schedule whose out-of-fold logits have the least
    cross-entropy once calibrated (each at its own fitted temperature), the longest schedule on a tie;
    and that cross-entropy per fraction."""
    nll = {}
    for q, logits in at_fraction.items():
        t = fit_temperature(logits, labels)
        nll[q] = float(F.cross_entropy(logits / t, labels))
    best = min(nll.values())
    return max(q for q, v in nll.items() if v <= best + 1e-9), nll
