"""`python -m bitdown ...` is the `bitdown` command (so `torchrun -m bitdown compress ...` launches it)."""
import sys

from .cli import main

sys.exit(main())
