"""Dataset sources, chat templating and assistant-only loss masks."""
