"""loraft: LoRA fine-tuning of causal language models, from data to a served chat model."""

__version__ = "0.1.0"
