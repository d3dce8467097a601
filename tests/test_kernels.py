"""batchgen's Mojo slot attention against NumPy: decode rows, prompt chunks, any slots."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from max.driver import CPU, Buffer

from batchgen.engine.kernels import standalone_slot_attention

H, SLOTS, MAXLEN = 3, 6, 1040


@pytest.fixture(scope="module")
def slot_attention():
    return standalone_slot_attention(H)


@pytest.fixture(scope="module")
def slot_attention_f16():
    return standalone_slot_attention(H, "float16")


def reference(q, k, v, k_cache, v_cache, offsets, slots, starts, prefix_slots, prefix_lens):
    """Write each row's new K/V into a copy of the caches, then attend causally in float64
    over its prefix's keys from the prefix's slot and the rest from its own."""
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    out = np.zeros_like(q)
    for b, (slot, start) in enumerate(zip(slots, starts, strict=True)):
        rows = slice(offsets[b], offsets[b + 1])
        n = offsets[b + 1] - offsets[b]
        k_cache[slot, :, start : start + n] = k[rows].transpose(1, 0, 2)
        v_cache[slot, :, start : start + n] = v[rows].transpose(1, 0, 2)
        shared, cut = prefix_slots[b], prefix_lens[b]
        keys = np.concatenate([k_cache[shared, :, :cut], k_cache[slot, :, cut : start + n]], 1)
        values = np.concatenate([v_cache[shared, :, :cut], v_cache[slot, :, cut : start + n]], 1)
        keys, values = keys.astype(np.float64), values.astype(np.float64)  # [H, L, D]
        scale = 1 / np.sqrt(q.shape[-1])
        scores = np.einsum("nhd,hld->nhl", q[rows].astype(np.float64), keys) * scale
        causal = np.arange(start + n)[None, :] <= (start + np.arange(n))[:, None]  # [n, L]
        scores = np.where(causal[:, None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[rows] = np.einsum("nhl,hld->nhd", weights, values)
    return out, k_cache, v_cache


def run(
    slot_attention,
    rng,
    rows: list[tuple[int, ...]],
    head_dim: int = 64,
    cache_dtype: type = np.float32,
):
    """rows: (slot, tokens cached before, new tokens[, prefix slot, prefix length]) per row;
    returns the op's and NumPy's outputs and caches."""
    D = head_dim
    offsets = np.concatenate([[0], np.cumsum([r[2] for r in rows])]).astype(np.uint32)
    total = int(offsets[-1])
    q, k, v = (rng.standard_normal((total, H, D), dtype=np.float32) for _ in range(3))
    k_cache = rng.standard_normal((SLOTS, H, MAXLEN, D), dtype=np.float32).astype(cache_dtype)
    v_cache = rng.standard_normal((SLOTS, H, MAXLEN, D), dtype=np.float32).astype(cache_dtype)
    slots = np.array([r[0] for r in rows], np.int64)
    starts = np.array([r[1] for r in rows], np.int64)
    prefix_slots = np.array([r[3] if len(r) > 3 else r[0] for r in rows], np.int64)
    prefix_lens = np.array([r[4] if len(r) > 3 else 0 for r in rows], np.int64)
    per_row = (offsets, slots, starts, prefix_slots, prefix_lens)
    expected = reference(q, k, v, k_cache, v_cache, *per_row)
    k_buffer, v_buffer = Buffer.from_numpy(k_cache.copy()), Buffer.from_numpy(v_cache.copy())
    out = slot_attention(
        *(Buffer.from_numpy(a) for a in (q, k, v)), k_buffer, v_buffer,
        *(Buffer.from_numpy(a) for a in per_row),
    )  # fmt: skip
    got = (out.to(CPU()).to_numpy(), k_buffer.to_numpy(), v_buffer.to_numpy())
    return got, expected


def assert_matches(got, expected) -> None:
    np.testing.assert_allclose(got[0], expected[0], atol=2e-5, rtol=0)
    np.testing.assert_array_equal(got[1], expected[1])  # the new K/V land exactly there
    np.testing.assert_array_equal(got[2], expected[2])


def test_decode_rows_of_lengths_1_to_1024_in_out_of_order_slots(slot_attention):
    rng = np.random.default_rng(0)
    # (slot, cached, new): slots out of order, a row at an empty slot, one at maxlen.
    rows = [(4, 0, 1), (1, 1023, 1), (5, 7, 1), (0, 300, 1), (2, MAXLEN - 1, 1), (3, 64, 1)]
    assert_matches(*run(slot_attention, rng, rows))


def test_rows_read_a_shared_prefix_from_another_slot(slot_attention):
    rng = np.random.default_rng(5)
    # (slot, cached, new, prefix slot, prefix length): decode rows and chunks of every size
    # around the query block, sharing all, part or none of what they have cached, several of
    # them the same prefix slot (which keeps its own row: slot 0 runs too).
    rows = [(1, 400, 1, 0, 400), (2, 400, 37, 0, 400), (3, 410, 3, 0, 400), (4, 300, 4, 0, 17),
            (5, 64, 5, 0, 0), (0, 500, 2, 0, 0)]  # fmt: skip
    assert_matches(*run(slot_attention, rng, rows))


def test_prompt_chunks_and_decode_rows_in_one_call(slot_attention):
    rng = np.random.default_rng(1)
    # Whole prompts, chunks that continue a prompt, and decode rows; chunk lengths around
    # the kernel's query block of 4 (1, 3, 4, 5, 9) and long (900).
    rows = [(2, 0, 900), (0, 10, 1), (5, 128, 5), (1, 0, 3), (4, 33, 4), (3, 0, 9)]
    assert_matches(*run(slot_attention, rng, rows))
    assert_matches(*run(slot_attention, rng, [(1, 124, MAXLEN - 124)]))  # up to maxlen


def test_one_row_and_no_new_tokens(slot_attention):
    rng = np.random.default_rng(2)
    assert_matches(*run(slot_attention, rng, [(0, 0, 1)]))
    assert_matches(*run(slot_attention, rng, [(3, 5, 0), (1, 2, 6)]))


@pytest.mark.parametrize("head_dim", [8, 16, 32, 128])
def test_every_head_size_it_is_built_for(slot_attention, head_dim):
    rng = np.random.default_rng(head_dim)
    rows = [(1, 0, 37), (4, 200, 1), (0, 12, 4), (2, 0, 2)]
    assert_matches(*run(slot_attention, rng, rows, head_dim))


def test_a_float16_cache_stores_rounded_keys_and_attends_in_float32(slot_attention_f16):
    """The new K/V are stored as float16 (NumPy's rounding), and read back into float32
    maths: against the same rounded cache in float64, the error is float32's alone."""
    rng = np.random.default_rng(4)
    rows = [(2, 0, 300), (0, 700, 1), (5, 12, 5), (1, 0, 1)]
    assert_matches(*run(slot_attention_f16, rng, rows, cache_dtype=np.float16))


def test_a_head_size_it_is_not_built_for_is_refused(slot_attention):
    with pytest.raises(ValueError, match="head_dim must be 8, 16, 32, 64 or 128"):
        run(slot_attention, np.random.default_rng(3), [(0, 0, 1)], head_dim=48)


def test_the_op_is_built_once_per_source_and_cached(tmp_path, monkeypatch):
    from batchgen.engine import kernels

    monkeypatch.setenv("BATCHGEN_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "slot_attention"
    shutil.copytree(kernels.SLOT_ATTENTION, source)
    built = kernels.built_package(source)
    assert built.name == "slot_attention.mojoc"
    assert built.parent.parent == tmp_path / "cache" / "kernels"
    stamp = built.stat().st_mtime_ns
    calls = []

    def compiler(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "(not run)")

    monkeypatch.setattr(kernels.subprocess, "run", compiler)
    assert kernels.built_package(source) == built and not calls  # cached: no compiler run
    assert built.stat().st_mtime_ns == stamp
    (source / "__init__.mojo").write_text((source / "__init__.mojo").read_text() + "\n# edit\n")
    with pytest.raises(kernels.KernelBuildError, match="not run"):  # a new hash: built again
        kernels.built_package(source)
    assert len(calls) == 1


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from batchgen.engine import kernels

    monkeypatch.setenv("BATCHGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kernels.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(kernels.KernelBuildError, match="mojo-compiler.*--kv-cache paged"):
        kernels.built_package()
