"""Entry points and helpers for training, fine-tuning and the end-to-end demo."""
