"""Inference engines that run the verifier and capture hidden states."""
