"""`python -m autoregembed_fast.train compress | reference | align ...`: the training commands of
AutoRegEmbed (`autoregembed_fast.method.training.commands`)."""

import sys

from autoregembed_fast.method.training.commands import main

if __name__ == "__main__":
    sys.exit(main())
