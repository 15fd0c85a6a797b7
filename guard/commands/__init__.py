"""One module per ``guard`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args) -> exit code``."""
