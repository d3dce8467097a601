"""SamplingParams validation and the per-row seed stream (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.engine.sampling import SamplingParams, draw_keys


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", -1), ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
     ("seed", -1), ("seed", 2**64), ("n", 0), ("n", 17), ("best_of", 17),
     ("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 21), ("presence_penalty", 2.5),
     ("frequency_penalty", -2.5), ("logit_bias", ((5, 101.0),))],
)  # fmt: skip
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"invalid {field}"):
        SamplingParams(**{field: value})


def test_greedy_means_temperature_zero():
    assert SamplingParams().greedy
    assert SamplingParams(top_k=5, seed=1).greedy
    # top_k=1 decodes greedily too, but through the sampler (tested against the engine).
    assert not SamplingParams(temperature=0.7, top_k=1).greedy


def test_draw_keys_depend_only_on_the_row_seed_and_token_index():
    seeds = np.array([0, 1, 2**63, 2**64 - 1], np.uint64)
    zeros = np.zeros(4, np.int64)
    first = draw_keys(seeds, zeros)
    assert first.dtype == np.uint64
    assert len(set(first.tolist())) == 4
    assert (draw_keys(seeds[::-1], zeros) == first[::-1]).all()
    assert (draw_keys(seeds[2:3], zeros[:1]) == first[2:3]).all()
    keys = draw_keys(np.zeros(100, np.uint64), np.arange(100))
    assert len(set(keys.tolist())) == 100


def test_cli_rejects_bad_sampling_options_before_loading_a_model():
    result = CliRunner().invoke(cli, ["generate", "hi", "--top-p", "2", "--model", "/absent"])
    assert result.exit_code == 2
    assert "'--top-p': 2.0 is not in the range 0<x<=1" in result.output
