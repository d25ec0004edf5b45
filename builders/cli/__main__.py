"""`python -m builders.cli`: the `enginesmith` command."""

from builders.cli.app import main

main()
