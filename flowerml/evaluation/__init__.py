"""A trained run evaluated on a split: its report and plots, and the per-image predictions it stores."""
