"""`python -m bench`: part 1, the op against the anchors (bench/op.py; its options are accepted
here too), then part 2, a stage-2 training step released-style vs ours (bench/method/train_step.py)."""

import sys

from bench import op
from bench.method import train_step

op.main(sys.argv[1:])
print()
train_step.main([])
