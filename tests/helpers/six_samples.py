"""Six hand-checked samples of four classes, and their loss worked out by hand: the metrics the
metric and report tests measure against.

    sample  target  logits          predicted
    0       0       [2, 0, 0, 0]    0  right
    1       0       [0, 3, 0, 0]    1  wrong
    2       0       [0, 1, 0, 0]    1  wrong
    3       1       [0, 2, 0, 0]    1  right
    4       1       [0, 0, 1, 0]    2  wrong
    5       2       [0, 0, 0, 4]    3  wrong

"sweet pea" (index 3) is predicted once but has no samples.
"""

from __future__ import annotations

import math

import torch

NAMES = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"]
LOGITS = torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 1.0, 0, 0], [0, 2.0, 0, 0],
                       [0, 0, 1.0, 0], [0, 0, 0, 4.0]])
TARGETS = torch.tensor([0, 0, 0, 1, 1, 2])


def hand_loss() -> float:
    """-log softmax of the target per row: log(sum exp) - target logit, each row by hand."""
    e = math.e
    per_sample = [math.log(e**2 + 3) - 2, math.log(e**3 + 3), math.log(e + 3),
                  math.log(e**2 + 3) - 2, math.log(e + 3), math.log(e**4 + 3)]
    return sum(per_sample) / 6
