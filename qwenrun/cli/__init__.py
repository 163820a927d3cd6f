"""The `qwenrun` command line: `main.py` parses and dispatches, one module runs each subcommand."""
