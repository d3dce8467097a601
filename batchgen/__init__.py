"""batchgen: batch and offline text generation with GPT-2 on Modular MAX."""

__version__ = "0.3.0"
