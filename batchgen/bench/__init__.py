"""`batchgen bench`: the engine next to Hugging Face and itself, and local vs Ray."""
