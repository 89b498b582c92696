"""The `know` command line: commands (cli.commands), live display (cli.display) and how a
command ends (cli.errors). The entry point is know_cli.main."""
