"""``python -m lmpatch.cli``: the same as the ``lmpatch`` command."""
from lmpatch.cli.app import main

main()
