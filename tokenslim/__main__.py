"""``python -m tokenslim ...`` (and ``torchrun -m tokenslim eval ...``) runs the command line."""
from .cli import main

main()
