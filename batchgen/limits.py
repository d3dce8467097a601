"""The caps a request may ask for, shared by the engine (its graphs are built for them) and the
line schemas (which refuse more); a leaf module, light to import."""

MAX_CHOICES = 16  # n and best_of at most (OpenAI caps best_of at 20; vLLM has no cap)
MAX_LOGPROBS = 20  # alternatives per token at most, as OpenAI allows
