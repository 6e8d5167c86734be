"""``python -m chargen``: the same as the ``chargen`` command."""

from chargen.cli import main

main()
