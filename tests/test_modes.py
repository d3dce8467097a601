"""The tutorial's modes (`batchgen gpt2`) driven as a user would, plus the chat's pieces."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ON_CPU, hf_greedy
from test_runner import child_env

from batchgen.engine import Request, SamplingParams, Step
from batchgen.engine.sampling import derive_seed
from batchgen.engine.textstream import token_bytes
from batchgen.modes.chat import STOP_STRINGS, ReplyStream, Turn, build_prompt
from batchgen.modes.interactive import PipeInput, parameter_count


def gpt2(tiny_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "batchgen", "gpt2", "--model", str(tiny_dir), *ON_CPU, *args]
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, env=child_env(), timeout=300
    )


def generated(stdout: str) -> list[str]:
    """The texts printed after each "Generated text:" line."""
    parts = stdout.split("Generated text:\n")[1:]
    return [part.split("\n\nEnter your prompt:")[0].rstrip("\n") for part in parts]


def test_prompt_mode_prints_banner_and_one_greedy_generation(tiny_dir, hf_tiny, tokenizer):
    prompt = "Once upon a time"
    done = gpt2(tiny_dir, "--prompt", prompt, "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert "Device: cpu, dtype: float32" in done.stdout
    assert "2 layers, 4 heads, 64 embedding dim" in done.stdout
    for timing in ("Model init:", "Weights loaded:", "To device + compile:"):
        assert timing in done.stdout
    expected = hf_greedy(hf_tiny, tokenizer(prompt).input_ids, 20)
    assert generated(done.stdout) == [prompt + tokenizer.decode(expected, skip_special_tokens=True)]


def test_prompt_mode_sampling_is_reproducible_with_a_seed(tiny_dir, tokenizer, engine):
    prompt = "The quick brown fox"
    done = gpt2(tiny_dir, "--prompt", prompt, "--seed", "4", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=derive_seed(4, 0))
    out = engine.generate([Request(tokenizer(prompt).input_ids, params)])
    text = tokenizer.decode(out.completions[0].token_ids, skip_special_tokens=True)
    assert generated(done.stdout) == [prompt + text]


def test_prompt_loop_reads_until_quit_and_skips_empty_lines(tiny_dir, hf_tiny, tokenizer):
    done = gpt2(tiny_dir, "--temperature", "0", stdin="Hello world\n\n   \nquit\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Enter your prompt:") == 4
    expected = hf_greedy(hf_tiny, tokenizer("Hello world").input_ids, 50)
    assert generated(done.stdout) == [
        "Hello world" + tokenizer.decode(expected, skip_special_tokens=True)
    ]


@pytest.mark.parametrize("ending", ["EOF", "SIGINT"])
def test_prompt_loop_exits_cleanly_on_eof_and_ctrl_c(tiny_dir, ending):
    command = [sys.executable, "-m", "batchgen", "gpt2", "--model", str(tiny_dir), *ON_CPU]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**child_env(), "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread's stack
    )
    if ending == "EOF":
        process.stdin.write("Hi\n")
        process.stdin.close()
    else:
        read_until(process.stdout.fileno(), b"Enter your prompt:")
        process.send_signal(signal.SIGINT)  # what Ctrl-C at the prompt sends
    try:
        code = process.wait(120)
    except subprocess.TimeoutExpired:  # seen twice under a loaded machine: say where it hangs
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=30)
        pytest.fail(f"still running 120 s after {ending}; its threads:\n{stderr[-6000:]}")
    assert code == 0
    assert "Traceback" not in process.stderr.read()


def test_pipe_input_reads_lines_and_a_signal_ends_its_wait():
    """The prompt loop's reader for a piped stdin: lines (the last without its newline too),
    then EOF; and a SIGINT that another thread takes (as when it lands just before the read)
    still ends the wait: input() would block on."""
    read_end, write_end = os.pipe()
    os.write(write_end, "one\ntwo ü\nthree".encode())
    os.close(write_end)
    previous = signal.getsignal(signal.SIGINT), signal.set_wakeup_fd(-1)
    try:
        read = PipeInput(read_end)
        assert [read(""), read(""), read("")] == ["one", "two ü", "three"]
        with pytest.raises(EOFError):
            read("")
        waiting, late = os.pipe()
        read = PipeInput(waiting)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Started before this thread blocks SIGINT, so the signal goes to the timer's thread;
        # a reader that missed it would get the late line instead of raising.
        kill = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        rescued = []
        rescue = threading.Timer(10, lambda: rescued.append(os.write(late, b"late\n")))
        kill.start()
        rescue.start()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with pytest.raises(KeyboardInterrupt):
                read("")
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            rescue.cancel()
        assert not rescued  # it raised on the signal, not once a line came
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.set_wakeup_fd(previous[1])


def read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} after {timeout} s; got {seen[-500:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the pty closed: the child exited
            chunk = b""
        if not chunk:
            raise AssertionError(f"output ended before {marker!r}; got {seen[-500:]!r}")
        seen += chunk
    return seen


def test_chat_streams_a_reply_in_a_terminal(tiny_dir):
    primary, secondary = os.openpty()
    command = [
        sys.executable,
        "-m",
        "batchgen",
        "gpt2",
        "--model",
        str(tiny_dir),
        *ON_CPU,
        "--chat",
    ]
    command += ["--seed", "1", "--max-new-tokens", "24"]
    env = {**child_env(), "COLUMNS": "80", "LINES": "24", "TERM": "xterm-256color"}
    process = subprocess.Popen(
        command, stdin=secondary, stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    try:
        read_until(primary, b"Human:")
        os.write(primary, b"Hello, who are you?\r")
        screen = read_until(primary, b"Human:")  # the reply panel, then the next prompt
        assert b"GPT-2" in screen and b"\xe2\x95\xad" in screen  # a rich panel: a box corner
        os.write(primary, b"quit\r")
        assert process.wait(60) == 0
    finally:
        process.kill()
        os.close(primary)


def test_benchmark_mode_prints_timings_and_batches(tiny_dir):
    args = ("--benchmark", "--max-new-tokens", "8", "--batch-sizes", "1,4", "--runs", "2")
    done = gpt2(tiny_dir, *args)
    assert done.returncode == 0, done.stderr
    for label in ("first token:", "per token:", "tokens/s:", "total time:"):
        line = next(line for line in done.stdout.splitlines() if label in line)
        assert float(line.split(label)[1].split()[0]) > 0
    assert "±" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines()[-2:]]
    assert [row[0] for row in rows] == ["1", "4"]
    assert all(float(row[1]) > 0 and row[3].endswith("x") for row in rows)


def test_build_prompt_drops_oldest_turns_to_fit(tokenizer):
    history = [Turn(f"question {i} " * 5, f"answer {i} " * 5) for i in range(6)]
    full, dropped = build_prompt(history, "last one?", tokenizer, budget=10_000)
    transcript = "".join(f"Human: {t.human}\nAI: {t.ai}\n" for t in history)
    assert dropped == 0
    assert full == tokenizer(transcript + "Human: last one?\nAI:").input_ids
    budget = len(full) - 20
    ids, dropped = build_prompt(history, "last one?", tokenizer, budget)
    text = tokenizer.decode(ids)
    assert len(ids) <= budget and dropped >= 1
    assert text.startswith(f"Human: {history[dropped].human}")
    assert text.endswith("Human: last one?\nAI:")
    ids, dropped = build_prompt(history, "x " * 300, tokenizer, budget=50)
    assert len(ids) == 50 and dropped == len(history)
    assert tokenizer.decode(ids).endswith("\nAI:")


def feed(reply: ReplyStream, ids: list[int]) -> int:
    """Drive a ReplyStream as the engine would; how many tokens until it saw a stop string."""
    for index, token in enumerate(ids):
        reply.on_step(Step(index, [0], np.array([token]), lambda: np.zeros((1, 0), np.float32)))
        if reply.stream.stopped:
            return index + 1
    return len(ids)


def test_chat_reply_holds_back_stop_strings_and_split_characters(tokenizer):
    vocab_bytes = token_bytes(tokenizer)
    shown: list[str] = []
    reply = ReplyStream(vocab_bytes, shown.append)
    text = " Hi 😀 there!\nHuman: and more"
    ids = tokenizer(text).input_ids
    assert "😀" not in [tokenizer.decode([t]) for t in ids]  # the emoji spans tokens
    fed = feed(reply, ids)
    assert "\nHuman:" in tokenizer.decode(ids[:fed]) and "\nHuman:" not in tokenizer.decode(
        ids[: fed - 1]
    )
    assert reply.finish() == "Hi 😀 there!"
    assert shown and all("\ufffd" not in s and "\n" not in s for s in shown)
    assert shown[-1] == "Hi 😀 there!"
    assert STOP_STRINGS == ("\nHuman:", "\nAI:")


def test_parameter_count_matches_transformers(hf_tiny, engine):
    assert parameter_count(engine.config) == sum(p.numel() for p in hf_tiny.parameters())
