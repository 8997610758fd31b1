"""``python -m neurostat`` runs the command line."""

from .cli import main

main(prog_name="neurostat")
