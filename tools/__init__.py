"""kvfstools: the `kvfs` command, one module per subcommand."""
