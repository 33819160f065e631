"""A registry entry's parts, for the registry and promotion tests: a test manifest's hash, the
model name, small weights and a card."""

from __future__ import annotations

MANIFEST = "a" * 64
MODEL = "flowers102"


def weights(seed: int) -> dict:
    import torch  # only the tests that register weights pay for torch's import

    return {"fc.weight": torch.full((3, 2), float(seed)), "fc.bias": torch.arange(3.0) + seed}


def card(top1: float, manifest: str = MANIFEST) -> dict:
    return {"metrics": {"top1": top1, "top5": 0.99, "loss": 0.2}, "test_manifest_sha256": manifest,
            "run_id": "run-1", "backbone": "resnet152"}
