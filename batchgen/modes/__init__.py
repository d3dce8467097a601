"""The MAX GPT-2 tutorial's modes: the prompt loop, --prompt, the chat and the benchmark."""
