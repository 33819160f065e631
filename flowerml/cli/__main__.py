"""`python -m flowerml.cli ...`: how the training launcher and torchrun start `train`."""

from flowerml.core.garbage import collect_long_lived_objects_rarely

collect_long_lived_objects_rarely()  # before the command loads torch (flowerml/core/garbage.py)

from flowerml.cli import main  # noqa: E402

main()
