"""The benchmark's workloads, and the Hugging Face baselines they are measured against.

Each job is a list of native input lines, seeded, so that every engine (this one, main's in
a worktree, HF) runs exactly the same work. `batchgen bench` and `bench/compare.py` use them.
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

# Common English words: prompts read like text, and tokenize like it (~1.3 tokens a word).
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "that",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "they",
    "this",
    "which",
    "people",
    "time",
    "year",
    "world",
    "city",
    "river",
    "music",
    "science",
    "history",
    "war",
    "government",
    "school",
    "water",
    "family",
    "story",
    "language",
    "film",
    "company",
    "system",
    "country",
    "early",
    "later",
    "first",
    "new",
    "great",
    "small",
    "large",
    "public",
    "local",
    "national",
    "light",
    "night",
    "morning",
    "garden",
    "market",
    "station",
    "began",
    "became",
    "found",
    "called",
    "known",
    "built",
    "wrote",
    "played",
    "moved",
    "grew",
    "opened",
    "turned",
    "carried",
]


def mixed_job(lines: int = 128, seed: int = 0) -> list[dict[str, Any]]:
    """Prompts of 8-200 words, max_tokens drawn from 8 to 256: rows end at very different
    steps, which is what continuous batching is for."""
    rng = random.Random(seed)
    return [
        {
            "id": i,
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 200))),
            "max_tokens": rng.randint(8, 256),
        }
        for i in range(lines)
    ]


def long_job(lines: int = 32, tokens: int = 500, max_tokens: int = 64, seed: int = 0):
    """Prompts of ~`tokens` random token ids (+-4%), `max_tokens` new tokens each."""
    rng = random.Random(seed)
    spread = tokens // 25
    return [
        {
            "id": i,
            "prompt": [rng.randrange(50000) for _ in range(rng.randint(tokens - spread, tokens))],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        for i in range(lines)
    ]


def shared_prefix_job(
    lines: int = 64, preamble: int = 400, max_tokens: int = 32, seed: int = 0
) -> list[dict[str, Any]]:
    """Prompts that all begin with one `preamble`-token block (a few-shot preamble, a system
    prompt), each with its own tail of 20-60 tokens; greedy, `max_tokens` new each."""
    rng = random.Random(seed)
    start = [rng.randrange(50000) for _ in range(preamble)]
    return [
        {
            "id": i,
            "prompt": start + [rng.randrange(50000) for _ in range(rng.randint(20, 60))],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        for i in range(lines)
    ]


def shared_document_job(
    continuations: int = 50, document: int = 400, seed: int = 0
) -> list[dict[str, Any]]:
    """One `document`-token text scored with each of its continuations of 5-20 tokens (echo,
    max_tokens 0): multiple-choice evaluation, as lm-eval's loglikelihood requests."""
    rng = random.Random(seed)
    start = [rng.randrange(50000) for _ in range(document)]
    return [
        {
            "id": i,
            "prompt": start + [rng.randrange(50000) for _ in range(rng.randint(5, 20))],
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
        }
        for i in range(continuations)
    ]


def uniform_prompts(batch: int, mean_len: int = 32, seed: int = 0) -> list[list[int]]:
    """Random token prompts of mean_len +-12%."""
    rng = random.Random(seed + batch)
    spread = max(1, mean_len // 8)
    lengths = [rng.randint(mean_len - spread, mean_len + spread) for _ in range(batch)]
    return [[rng.randrange(50000) for _ in range(n)] for n in lengths]


def write_job(path: Path, lines: Sequence[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


@dataclass(frozen=True)
class JobRun:
    """One `batchgen run` process: wall time, its summary, its peak memory."""

    wall_s: float
    summary: dict[str, Any]
    peak_rss_mb: float

    @property
    def tokens_per_s(self) -> float:
        return self.summary["generated_tokens"] / self.wall_s


def run_job_process(
    job: Path,
    model: Path,
    out_dir: Path,
    device: str = "cpu",
    args: Sequence[str] = (),
    pythonpath: str | None = None,
) -> JobRun:
    """`batchgen run` as a real process (start-up and compile included), with `pythonpath`
    in front (another checkout's batchgen) when given."""
    out = out_dir / f"out-{time.monotonic_ns()}.jsonl"
    metrics = out.with_suffix(".metrics")
    argv = [sys.executable, "-m", "batchgen", "run", str(job), str(out), "--model", str(model),
            "--device", device, "--metrics", str(metrics), "--quiet", *args]  # fmt: skip
    # An explicit env: importing MAX setenv()s variables behind os.environ's back.
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    # Not from a checkout's root: `python -m` puts the working directory first on sys.path.
    process = subprocess.Popen(argv, env=env, cwd=out_dir, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"batchgen run {' '.join(args)} exited {code}:\n{stderr}")
    summary = orjson.loads(metrics.read_bytes().splitlines()[-1])
    # main's engine (0.2) did not report it; then the child's getrusage, which counts the
    # parent's memory at the fork too.
    peak = summary.get("peak_rss_mb") or usage.ru_maxrss / 1024
    return JobRun(wall, summary, peak)


def hf_model(model_dir: Path, device: str = "cpu"):
    """HF's GPT-2: float32 with all cores on the CPU, bfloat16 on CUDA (as batchgen's GPU)."""
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    if device == "gpu":
        model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.bfloat16)
        return model.to("cuda").eval()
    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> None:
    """HF greedy generate with KV cache over a left-padded batch (its documented batch setup)."""
    width = max(len(p) for p in prompts)
    pad = model.config.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask.to(model.device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
        )


def hf_score(model, prompts: list[list[int]]) -> list[float]:
    """HF's log-probabilities of each prompt token after the first: one forward pass over a
    right-padded batch, log-softmax, the prompt's own tokens gathered (an lm-eval scorer)."""
    width = max(len(p) for p in prompts)
    pad = model.config.eos_token_id
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=model.device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask.to(model.device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        taken = logprobs.gather(-1, ids[:, 1:, None])[..., 0]
    return [float(taken[i, : len(p) - 1].sum()) for i, p in enumerate(prompts)]


def hf_careful_loop(model, tokenizer, lines: Sequence[dict[str, Any]], batch: int = 32) -> int:
    """What a careful hand-written HF loop does with a job: sort by max_tokens and length,
    batches of `batch`, left padding, generate each batch to its longest max_tokens, cut each
    row to its own. Returns the tokens kept (the same count batchgen generates, greedy)."""
    items = []
    for line in lines:
        prompt = line["prompt"]
        ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        items.append((line["max_tokens"], len(ids), ids, line.get("ignore_eos", False)))
    items.sort(key=lambda item: (item[0], item[1]))
    eos = model.config.eos_token_id
    kept = 0
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        width = max(n for _, n, _, _ in chunk)
        ids = torch.tensor([[eos] * (width - n) + p for _, n, p, _ in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for _, n, _, _ in chunk])
        mask = mask.to(model.device)
        longest = max(m for m, _, _, _ in chunk)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=longest,
                                 do_sample=False, use_cache=True, pad_token_id=eos)  # fmt: skip
        for (max_tokens, _, _, ignore_eos), row in zip(chunk, out[:, width:].cpu(), strict=True):
            tokens = row[:max_tokens].tolist()
            if not ignore_eos and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            kept += len(tokens)
    return kept


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    from batchgen.job.metrics import peak_rss_mb as vm_hwm

    return vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
