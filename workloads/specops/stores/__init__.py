"""Sinks and sources for ExampleDicts: disk shards, a local queue, a ZeroMQ broker."""
