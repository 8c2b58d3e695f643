"""``python -m loraserve``: the same as the ``loraserve`` command."""

from loraserve.cli import main

main()
