"""Evaluation harness for MoE models: quality, routing behaviour and cost (`python -m eval`)."""
