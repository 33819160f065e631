"""The networks: backbones with a fresh classification head, their pretrained weights, mixed precision, and the device or DDP group they run on."""
