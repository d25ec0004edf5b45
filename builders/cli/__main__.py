"""`python -m enginesmith.builders.cli`: the `enginesmith` command."""

from enginesmith.builders.cli.app import main

main()
