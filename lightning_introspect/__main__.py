"""``python -m lightning_introspect report LOGDIR``: the same as the ``lightning-introspect`` command."""
import sys

from lightning_introspect.report import main

if __name__ == "__main__":
    sys.exit(main())
