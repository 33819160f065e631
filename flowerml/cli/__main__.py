"""`python -m flowerml.cli ...`: how the training launcher and torchrun start `train`."""

from flowerml.cli import main

main()
