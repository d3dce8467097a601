"""Where `--model` is: a local checkpoint directory, the Hugging Face cache, or the Hub,
found before anything loads, so that a run that cannot find its model says so at once."""

from __future__ import annotations

import os
from pathlib import Path

HUB_TIMEOUT_S = 5.0  # the Hub answers in well under a second; no network fails at once
_WHAT_TO_DO = (
    "pass --model DIR (a GPT-2 checkpoint directory), or write a random-weight one with "
    "`batchgen random-model DIR`"
)


class ModelNotFound(Exception):
    """The model is neither a local directory, nor cached, nor on a Hub that answers."""


def locate(model: str) -> str:
    """Where the model will load from ("local", "cache" or "hub"); ModelNotFound if nowhere."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"cannot load model {model!r}: a directory without config.json; {_WHAT_TO_DO}"
            )
        return "local"
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        raise ModelNotFound(
            f"cannot load model {model!r}: no such directory; {_WHAT_TO_DO}"
        ) from None
    if isinstance(cached, str):
        return "cache"
    where = f"no directory {model!r} and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    offline = {os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if constants.HF_HUB_OFFLINE or offline & {"1", "true", "yes", "on"}:
        raise ModelNotFound(
            f"cannot load model {model!r}: {where}, and HF_HUB_OFFLINE is set; {_WHAT_TO_DO}"
        )
    from huggingface_hub import model_info

    try:
        model_info(model, timeout=HUB_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - no network, no such repo, a proxy: all say one thing
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFound(
            f"cannot load model {model!r}: {where}, and the Hub did not serve it ({reason}); "
            + _WHAT_TO_DO
        ) from None
    return "hub"
