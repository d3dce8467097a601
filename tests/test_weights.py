"""Checkpoint loading: name mapping, Conv1D transposes, Hub-cache resolution, device choice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ON_CPU, hf_greedy
from max.driver import accelerator_count
from transformers import GPT2Config as HFConfig

from batchgen.engine.engine import EngineConfig, resolve_device
from batchgen.engine.weights import (
    config_from_hf,
    convert_state_dict,
    load_checkpoint,
    load_tokenizer,
    resolve,
)


def test_state_dict_maps_one_to_one_with_conv1d_transposed(hf_tiny):
    state = hf_tiny.state_dict()
    weights = convert_state_dict(state, torch.float32)
    assert "lm_head.weight" not in weights  # tied to transformer.wte.weight
    assert set(weights) == {k for k in state if k != "lm_head.weight"}
    c_attn = "transformer.h.1.attn.c_attn.weight"
    assert weights[c_attn].shape == (3 * 64, 64)
    assert (weights[c_attn] == state[c_attn].T.numpy()).all()
    assert weights[c_attn].flags.c_contiguous
    wte = "transformer.wte.weight"
    assert (weights[wte] == state[wte].numpy()).all()


def test_legacy_attention_buffers_are_skipped(hf_tiny):
    state = dict(hf_tiny.state_dict())
    expected = set(convert_state_dict(state, torch.float32))
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    assert set(convert_state_dict(state, torch.float32)) == expected


def test_config_comes_from_the_checkpoint(tiny_dir):
    checkpoint = load_checkpoint(tiny_dir, torch.float32)
    config = checkpoint.config
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (2, 4, 64, 1024)
    assert config.eos_token_id == 50256
    with pytest.raises(ValueError, match="activation"):
        config_from_hf(HFConfig(activation_function="relu"))
    with pytest.raises(ValueError, match="attention scaling"):
        config_from_hf(HFConfig(scale_attn_by_inverse_layer_idx=True))


def test_missing_local_path_is_reported_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        resolve(tmp_path / "absent")
    assert resolve("gpt2") == "gpt2"
    assert resolve(tmp_path) == tmp_path


def test_checkpoint_without_tokenizer_gets_the_bundled_gpt2_one(tiny_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer(" The quick brown fox").input_ids == [383, 2068, 7586, 21831]


def test_default_gpt2_resolves_offline_from_a_hub_cache(tiny_dir, hf_tiny, tmp_path):
    """`--model gpt2` (the default) loads from a Hub-layout cache with HF_HUB_OFFLINE=1."""
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    prompt = "Hello world"
    result = subprocess.run(
        [sys.executable, "-m", "batchgen", "generate", prompt, "--max-tokens", "8", *ON_CPU],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(tiny_dir)
    expected = hf_greedy(hf_tiny, tokenizer(prompt).input_ids, 8)
    assert result.stdout == prompt + tokenizer.decode(expected) + "\n"
    assert "cpu" in result.stderr and "float32" in result.stderr


def test_device_and_dtype_are_explicit():
    cpu, dtype = resolve_device(EngineConfig(device="cpu"))
    assert (cpu.label, str(dtype)) == ("cpu", "DType.float32")
    with pytest.raises(ValueError, match="bfloat16 is supported on GPU only"):
        resolve_device(EngineConfig(device="cpu", dtype="bfloat16"))


@pytest.mark.skipif(accelerator_count() > 0, reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_fails_clearly():
    with pytest.raises(ValueError, match="no accelerator"):
        resolve_device(EngineConfig(device="gpu"))
    device, dtype = resolve_device(EngineConfig())
    assert (device.label, str(dtype)) == ("cpu", "DType.float32")


def test_bundled_tokenizer_is_shipped_with_the_package():
    from batchgen.engine.weights import BUNDLED_TOKENIZER

    assert (Path(BUNDLED_TOKENIZER) / "tokenizer.json").is_file()


def test_a_model_that_is_nowhere_fails_at_once_saying_what_to_do(tmp_path: Path, monkeypatch):
    """Issue 17, defect 3: no local directory, no cache, no Hub: one line, in well under 28 s."""
    import time

    from batchgen.job.models import ModelNotFound, locate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for model in ("gpt2", str(tmp_path / "missing")):
        with pytest.raises(ModelNotFound, match="random-model"):
            locate(model)
    assert time.perf_counter() - start < 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="without config.json"):
        locate(str(empty))
