"""One module per CLI command: `register(parser)` and `main(args) -> int`."""
