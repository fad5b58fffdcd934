"""``python -m guardfab``: the same as the ``guardfab`` command."""

from guardfab.cli.main import main

main()
