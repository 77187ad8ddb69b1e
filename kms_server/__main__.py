# `python -m kms_server` runs the `kmsd` command line.
from kms_server.cli import main

main(prog_name="kmsd")
