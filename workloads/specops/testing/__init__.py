"""Fast, deterministic fixtures: a tiny verifier with tokenizer, and synthetic conversations.

Used by the test suite, the benchmarks and small demos; nothing here downloads anything.
"""
