"""``python -m chargen``: the same as the ``chargen`` command."""

from chargen.entry import main

main()
