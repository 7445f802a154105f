"""deltatune: parameter-efficient fine-tuning for PyTorch / transformers models."""
