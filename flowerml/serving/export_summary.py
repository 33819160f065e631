"""What a version's export says, as people read it: the figures of export.json (and its int8
block) for the card, the CLI and the Prefect reports, the one line on the int8 gate, and
card.md rendered again with them. Writing the export is `flowerml.serving.export`'s.
"""

from __future__ import annotations

from typing import Any

from flowerml.registry.versions import Registry

CPU_PROVIDER = "CPUExecutionProvider"


def export_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The export's figures as the card and the reports show them."""
    parity = record["parity"]
    return {"file": record["file"], "sha256": record["sha256"], "bytes": record["bytes"],
            "weights_bytes": record.get("weights_bytes"), "exporter": record["exporter"],
            "opset": record["opset"], "input": f"{record['input']['dtype']} "
            f"{record['input']['layout']} {record['input']['size'][0]} px",
            "parity_passed": parity["passed"], "top1_agreement": parity["top1_agreement"],
            "max_abs_logit_diff": parity["max_abs_logit_diff"],
            "parity_images": parity["images"],
            "torch_images_per_second": parity["torch_images_per_second"],
            "onnx_images_per_second": parity["onnx_images_per_second"],
            "parity_reference": parity.get("reference", "pytorch"),
            "parity_provider": parity.get("provider", CPU_PROVIDER),
            **int8_summary(record.get("int8"))}


def int8_summary(int8: dict[str, Any] | None) -> dict[str, Any]:
    """The int8 figures as the card and the reports show them (`int8_passed` None: no int8)."""
    if not int8:
        return {"int8_passed": None}
    gate = int8["gate"]
    return {"int8_passed": gate["passed"], "int8_file": int8["file"],
            "int8_bytes": int8["bytes"], "int8_top1_agreement": gate["top1_agreement"],
            "int8_top1_delta": gate["top1_delta"], "int8_images": gate["images"],
            "int8_images_per_second": int8["int8_images_per_second"],
            "fp32_images_per_second": int8["fp32_images_per_second"]}


def int8_line(summary: dict[str, Any]) -> str | None:
    """One line on the int8 graph for the CLI, the flow's log and the report; None when the
    export made none."""
    if summary.get("int8_passed") is None:
        return None
    figures = (f"top-1 agreement with fp32 {summary['int8_top1_agreement']:.2%}, test top-1 "
               f"{summary['int8_top1_delta'] * 100:+.2f} points on {summary['int8_images']} "
               f"test images; {summary['int8_bytes'] / 1e6:.1f} MB, "
               f"{summary['int8_images_per_second']:.1f} images/s")
    if summary["int8_passed"]:
        return f"int8 passed its gate: {figures}"
    return (f"int8 FAILED its gate ({figures}): the version is promoted and served on fp32 "
            "ONNX; --runtime auto will not take int8")


def show_on_card(registry: Registry, version: int, record: dict[str, Any]) -> None:
    """card.md again, with an `export` section: card.json stays as registered (it is the
    version's record at registration); export.json is the export's own create-only record."""
    from flowerml.registry.release import render_card

    card = registry.get(version).card
    prefix = registry.attachment_key(version, "")
    files = sorted(info.key[len(prefix):] for info in registry.store.list(prefix))
    summary = export_summary(record)
    shown = {**card, "export": summary}
    if int8_line(summary):
        shown["int8"] = int8_line(summary)  # in the summary table: what serves on a CPU
    markdown = render_card(shown, [name for name in files if name not in {"CLAIM", "COMMITTED"}])
    registry.store.put_bytes(registry.attachment_key(version, "card.md"), markdown.encode())
