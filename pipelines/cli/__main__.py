"""`python -m pipelines.cli`: the `ens` command (how the tests and Ray workers start it)."""

from . import main

main()
