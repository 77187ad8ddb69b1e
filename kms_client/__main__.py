# `python -m kms_client`: runs the `kms` command line, exactly as the installed script does.
# Must hold no logic of its own.
"""Run the ``kms`` command line."""

from kms_client.cli import main

main()
