"""Turn WavTokenizer training checkpoints into Hugging Face-style folders for llama.cpp."""

__version__ = "0.1.0"
