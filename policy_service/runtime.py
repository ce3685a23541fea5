"""PolicyRuntime: the annotator and the generator as plain Python over torch (no grpc).

Life cycle (KServe's model base): `load()` fills both model slots from the store, `healthy()` says
whether they are loaded, `annotate_batch` / `generate_batch` run one batch on a given loaded version
(the caller pins the version per request so that a swap never mixes versions in one response).
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loopserve import metrics
from loopserve.config import PolicyConfig
from loopserve.device import pick_device, pick_dtype
from loopserve.errors import InvalidArgument, ModelFault, VerificationError
from loopserve.models import encoder_heads, generator, verify
from loopserve.models.encoder_heads import AnnotatorModel
from loopserve.models.micro_batches import padded_groups, token_budget
from loopserve.models.slot import Loaded, ModelSlot
from loopserve.models.store import ModelStore, VersionReader
from loopserve.models.tokenizers import unshared
from policy_service import sampling
from policy_service.continuous import DecodeBatch
from policy_service.exploration import ExplorationRule, Explorer, rule_of
from policy_service.types import (
    AnnotateCall,
    Annotation,
    Completion,
    GenerateCall,
    LabelScore,
    TokenDelta,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotatorBundle:
    model: AnnotatorModel
    tokenizer: PreTrainedTokenizerBase
    checked: bool = False
    """The version passed the trainer's gate with its calibration fitted on items it was not trained on
    (manifest meta `checked`), or an operator vouched for it. An unchecked version (the zero-shot base,
    weights published without that word) flags every item needs_review: its confidence is not a
    probability anyone has measured, and nothing should be auto-labelled on its word."""

    @property
    def labels(self) -> list[str]:
        return self.model.spec.label_names


@dataclass(frozen=True)
class GeneratorBundle:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class RuntimeOptions:
    device: torch.device
    dtype: torch.dtype
    max_input_tokens: int = 256
    token_budget: int = 0
    """Padded tokens per encoder forward, as `--encoder-token-budget`: 0 takes the device's rule (512 on a CPU,
    no token limit on a GPU: loopserve.models.micro_batches.token_budget), resolved here, where the device is
    known, so every caller of the runtime cuts alike."""
    review_threshold: float = 0.8
    max_prompt_tokens: int = 1024
    generator: bool = True
    exploration: ExplorationRule = field(default_factory=ExplorationRule)

    def __post_init__(self) -> None:
        self.token_budget = token_budget(self.token_budget, self.device.type)

    @classmethod
    def of(cls, cfg: PolicyConfig) -> RuntimeOptions:
        """The options a policy process serves with (the grpc.aio app and each Ray replica alike)."""
        device = pick_device(cfg.device)
        return cls(
            device=device,
            dtype=pick_dtype(cfg.dtype, device),
            max_input_tokens=cfg.max_input_tokens,
            token_budget=cfg.encoder_token_budget,
            review_threshold=cfg.review_threshold,
            max_prompt_tokens=cfg.max_prompt_tokens,
            generator=cfg.generator,
            exploration=rule_of(cfg),
        )


class PolicyRuntime:
    def __init__(self, store: ModelStore, options: RuntimeOptions) -> None:
        self.store = store
        self.opts = options
        self.annotator: ModelSlot[AnnotatorBundle] = ModelSlot(
            "annotator", store, self._load_annotator, self._check_annotator
        )
        self.generator: ModelSlot[GeneratorBundle] | None = (
            ModelSlot("generator", store, self._load_generator, self._check_generator) if options.generator else None
        )
        self.explorer = Explorer(options.exploration)

    # ---- life cycle ----------------------------------------------------------------------------

    def load(self) -> None:
        self.annotator.load_latest()
        if self.generator is not None:
            self.generator.load_latest()

    def healthy(self) -> bool:
        return self.annotator.ready and (self.generator is None or self.generator.ready)

    def slots(self) -> dict[str, ModelSlot]:  # type: ignore[type-arg]
        out: dict[str, ModelSlot] = {"annotator": self.annotator}  # type: ignore[type-arg]
        if self.generator is not None:
            out["generator"] = self.generator
        return out

    # ---- loaders and checks (run by ModelSlot during a swap) -----------------------------------

    def _load_annotator(self, reader: VersionReader, serving: Loaded[AnnotatorBundle] | None) -> AnnotatorBundle:
        folder, manifest = reader.folder, reader.manifest
        old = (serving.model.model, serving.manifest) if serving is not None else None
        model = encoder_heads.load(folder, self.opts.device, self.opts.dtype, reader=reader, serving=old)
        if not isinstance(model, AnnotatorModel):
            raise VerificationError(f"{folder.name} is not an annotator (head kind {model.spec.kind!r})")
        if serving is not None and reader.unchanged_besides_weights(serving.manifest, ignore=[encoder_heads.HEAD_FILE]):
            tokenizer = unshared(serving.model.tokenizer)  # the same files: copied, not read again
        else:
            tokenizer = encoder_heads.load_tokenizer(folder)
        return AnnotatorBundle(model, tokenizer, bool(manifest.meta.get("checked")))

    def _check_annotator(self, new: Loaded[AnnotatorBundle], old: Loaded[AnnotatorBundle] | None) -> None:
        old_labels = old.model.labels if old is not None else None
        verify.check_encoder(new.model.model, new.model.tokenizer, old_labels, new.manifest.meta)

    def _load_generator(self, reader: VersionReader, serving: Loaded[GeneratorBundle] | None) -> GeneratorBundle:
        model = generator.load(reader.folder, self.opts.device, self.opts.dtype, reader=reader)
        if serving is not None and reader.unchanged_besides_weights(serving.manifest):
            tokenizer = unshared(serving.model.tokenizer)  # the same files: copied, not read again
        else:
            tokenizer = generator.load_tokenizer(reader.folder)
        return GeneratorBundle(model, tokenizer)

    def _check_generator(self, new: Loaded[GeneratorBundle], old: Loaded[GeneratorBundle] | None) -> None:
        old_tokenizer = old.model.tokenizer if old is not None else None
        verify.check_generator(new.model.model, new.model.tokenizer, old_tokenizer, new.manifest.meta)

    # ---- annotate ------------------------------------------------------------------------------

    def _encode(self, bundle: AnnotatorBundle, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids cut to the window, and whether each text was cut (one tokenizer pass)."""
        enc = bundle.tokenizer(
            texts, truncation=True, max_length=self.opts.max_input_tokens, return_overflowing_tokens=True
        )
        ids: list[list[int] | None] = [None] * len(texts)
        truncated = [False] * len(texts)
        for row, sample in enumerate(enc["overflow_to_sample_mapping"]):
            if ids[sample] is None:
                ids[sample] = enc["input_ids"][row]
            else:  # an overflow chunk: the text did not fit the window
                truncated[sample] = True
        return [x or [] for x in ids], truncated

    def label_probs(self, bundle: AnnotatorBundle, texts: list[str]) -> list[list[float]]:
        """(n, L) calibrated label probabilities of `bundle` on `texts` (a shadow candidate's answers)."""
        return self._annotator_probs(bundle, texts)

    @torch.inference_mode()
    def _annotator_probs(self, bundle: AnnotatorBundle, texts: list[str]) -> list[list[float]]:
        return self._probs_from_ids(bundle, self._encode(bundle, texts)[0])

    @torch.inference_mode()
    def _probs_from_ids(self, bundle: AnnotatorBundle, input_ids: list[list[int]]) -> list[list[float]]:
        tok = bundle.tokenizer
        out: list[list[float]] = [[] for _ in input_ids]
        for idx, batch in padded_groups(tok, {"input_ids": input_ids}, self.opts.token_budget):
            logits = bundle.model(
                batch["input_ids"].to(self.opts.device), batch["attention_mask"].to(self.opts.device)
            )  # (b, L), already divided by the fitted temperature
            probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
            for i, p in zip(idx, probs, strict=True):
                out[i] = p
        return out

    def annotate_batch(
        self, handle: Loaded[AnnotatorBundle], calls: list[AnnotateCall]
    ) -> list[list[Annotation] | Exception]:
        """One forward over every item of every call; per call, its annotations in item order, or the
        error of that call alone (a non-finite output is the model's fault: ModelFault, INTERNAL)."""
        bundle = handle.model
        labels = bundle.labels
        texts = [t for c in calls for t in c.texts]
        input_ids, truncated = self._encode(bundle, texts)
        probs = self._probs_from_ids(bundle, input_ids)
        results: list[list[Annotation] | Exception] = []
        k = 0
        for call in calls:
            top_k = call.top_k or len(labels)
            anns = []
            n = len(call.item_ids)
            if not all(math.isfinite(x) for p in probs[k : k + n] for x in p):
                metrics.MODEL_FAULTS.labels("annotator").inc()
                logger.error("annotator %s gave non-finite outputs on a batch of %d items", handle.version, n)
                results.append(ModelFault("the annotator produced non-finite scores; the server logged the incident"))
                k += n
                continue
            for item_id in call.item_ids:
                anns.append(self._annotation(bundle, item_id, probs[k], top_k, truncated[k]))
                k += 1
            results.append(anns)
        return results

    def _annotation(
        self, bundle: AnnotatorBundle, item_id: str, p: list[float], top_k: int, truncated: bool
    ) -> Annotation:
        """One item's answer: the served label (chosen by the task's exploration rule) first, then the
        others best first, with the probability with which the served label was chosen."""
        labels = bundle.labels
        served, propensity = self.explorer.choose(labels, p)
        ranked = [served, *sorted((j for j in range(len(labels)) if j != served), key=lambda j: -p[j])]
        scores = tuple(LabelScore(labels[j], float(p[j])) for j in ranked[:top_k])
        explored = p[served] < max(p)  # not the model's best guess: a person must see it
        return Annotation(
            item_id=item_id,
            event_id=uuid.uuid4().hex,
            labels=scores,
            needs_review=explored or not bundle.checked or scores[0].score < self.opts.review_threshold,
            truncated=truncated,
            propensity=propensity,
        )

    # ---- generate ------------------------------------------------------------------------------

    def prompt_ids(self, handle: Loaded[GeneratorBundle], call: GenerateCall) -> list[int]:
        tok = handle.model.tokenizer
        ids = tok(generator.prompt_text(tok, call.prompt, not call.raw_prompt), add_special_tokens=False)["input_ids"]
        if len(ids) > self.opts.max_prompt_tokens:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens; the limit is {self.opts.max_prompt_tokens}")
        return list(ids)

    def generate_batch(
        self,
        handle: Loaded[GeneratorBundle],
        jobs: list[tuple[GenerateCall, list[int], list[sampling.SequenceRequest]]],
    ) -> list[list[Completion] | Exception]:
        """Static batching: decode every sequence of every job in one batch, start to end; per job, its
        completions, or the error of that job alone (one row's failure never fails the others)."""
        bundle = handle.model
        outs = sampling.generate(bundle.model, bundle.tokenizer, [s for _, _, seqs in jobs for s in seqs])
        results: list[list[Completion] | Exception] = []
        k = 0
        for job in jobs:
            n = len(job[2])
            results.append(self.completions(handle, job, outs[k : k + n]))
            k += n
        return results

    def decode_batch(self, handle: Loaded[GeneratorBundle]) -> DecodeBatch:
        """A running batch on this version that requests join and leave token by token (continuous)."""
        return DecodeBatch(handle.model.model, handle.model.tokenizer)

    def completions(
        self,
        handle: Loaded[GeneratorBundle],
        job: tuple[GenerateCall, list[int], list[sampling.SequenceRequest]],
        outs: list[sampling.SequenceResult],
    ) -> list[Completion] | Exception:
        """One job's decoded rows -> its completions, or the error of its first failed row."""
        call = job[0]
        failed = next((r.error for r in outs if r.error is not None), None)
        if failed is not None:
            if isinstance(failed, ModelFault):
                metrics.MODEL_FAULTS.labels("generator").inc()
                logger.error("generator %s gave non-finite logits", handle.version)
            return failed
        return [
            Completion(
                text=r.text,
                event_id=uuid.uuid4().hex,
                num_tokens=len(r.token_ids),
                finish_reason=r.finish_reason,
                sequence_logprob=r.sequence_logprob,
                token_logprobs=tuple(r.token_logprobs) if call.params.logprobs else (),
            )
            for r in outs
        ]

    @staticmethod
    def sequence_requests(
        call: GenerateCall, prompt_ids: list[int], on_token: object = None, cancelled: object = None
    ) -> list[sampling.SequenceRequest]:
        """n rows for one call; with a seed, row i uses seed + i (reproducible, yet distinct)."""
        seqs = []
        for i in range(call.n):
            seq = sampling.SequenceRequest(
                prompt_ids=prompt_ids,
                params=call.params,
                row_seed=None if call.params.seed is None else call.params.seed + i,
            )
            if on_token is not None:
                seq.on_token = on_token  # type: ignore[assignment]
            if cancelled is not None:
                seq.cancelled = cancelled  # type: ignore[assignment]
            seqs.append(seq)
        return seqs


__all__ = ["AnnotatorBundle", "GeneratorBundle", "PolicyRuntime", "RuntimeOptions", "TokenDelta"]
