"""Loading GPT-2 checkpoints and tokenizers with `from_pretrained` semantics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers import GPT2Config as HFConfig

from batchgen.engine.model import GPT2Config

# Hugging Face's Conv1D stores [in, out]; MAX's Linear wants [out, in].
_CONV1D_SUFFIXES = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)
# Causal-mask buffers of older checkpoints, and the head tied to `wte`.
_SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_SKIPPED_KEYS = ("lm_head.weight",)

BUNDLED_TOKENIZER = Path(__file__).parent.parent / "data" / "gpt2-tokenizer"


@dataclass
class Checkpoint:
    """A GPT-2 config and its weights as contiguous host arrays keyed by MAX names."""

    config: GPT2Config
    weights: dict[str, np.ndarray | torch.Tensor]


def config_from_hf(hf: HFConfig, eos_token_id: int | list[int] | None = None) -> GPT2Config:
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"unsupported activation {hf.activation_function!r}: batchgen "
            "implements GPT-2's tanh GELU only"
        )
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
        raise ValueError("unsupported attention scaling: batchgen implements GPT-2's 1/sqrt(d)")
    eos = eos_token_id if eos_token_id is not None else hf.eos_token_id
    if isinstance(eos, list):  # generation configs may list several; GPT-2 has one
        eos = eos[0]
    return GPT2Config(
        vocab_size=hf.vocab_size,
        n_positions=hf.n_positions,
        n_embd=hf.n_embd,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_inner=hf.n_inner,
        layer_norm_epsilon=hf.layer_norm_epsilon,
        eos_token_id=50256 if eos is None else int(eos),
    )


def convert_state_dict(
    state: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, np.ndarray | torch.Tensor]:
    """HF GPT-2 tensors -> MAX parameter arrays: Conv1D transposed, cast, contiguous."""
    out: dict[str, np.ndarray | torch.Tensor] = {}
    for name, tensor in state.items():
        if name in _SKIPPED_KEYS or name.endswith(_SKIPPED_SUFFIXES):
            continue
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.T
        tensor = tensor.detach().to(dtype).contiguous()
        # numpy has no bfloat16: hand MAX the raw bits through DLPack instead.
        out[name] = tensor if dtype == torch.bfloat16 else tensor.numpy()
    return out


def resolve(model: str | Path) -> str | Path:
    """A local directory if `model` names one, else a Hub name; a missing path is an error."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if isinstance(model, Path) or str(model).startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no checkpoint directory at {model}")
    return str(model)


def load_checkpoint(model: str | Path, dtype: torch.dtype) -> Checkpoint:
    """Load a GPT-2 of any size from a Hub name (e.g. `gpt2`) or a local directory."""
    hf_model = GPT2LMHeadModel.from_pretrained(resolve(model), dtype=torch.float32)
    # generation_config.json, when present, is where HF's generate() reads EOS from.
    config = config_from_hf(hf_model.config, hf_model.generation_config.eos_token_id)
    return Checkpoint(config, convert_state_dict(hf_model.state_dict(), dtype))


def load_tokenizer(model: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer, else the bundled GPT-2 BPE (same for all sizes)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    except (OSError, ValueError):
        return AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    # A directory with a config but no tokenizer files loads as a tokenizer with an empty
    # vocabulary that encodes every text to [], instead of failing.
    if not tokenizer("Hello").input_ids:
        return AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    return tokenizer
