"""The `gemmakit` command (main.py) and the model options its subcommands share (options.py)."""
