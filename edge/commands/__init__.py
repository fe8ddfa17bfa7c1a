"""One module per ``cytoedge`` subcommand (see edge/cli.py)."""
