"""Speculator (draft) models in the speculators format that vLLM serves."""
