"""The model at work: ONNX export, the runtimes that score pixels, predicting image files, and batch scoring in shards."""
