"""The verbs of the `unpoison` command, one module each (see cli.COMMANDS)."""
