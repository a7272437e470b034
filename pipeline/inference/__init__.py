"""Inference: running a trained FCN on images, exporting it, and timing it.

`predict` is `fcn-predict` (image files in, label maps and overlays out), `export` writes and
checks the ONNX files, `speed` measures latency, throughput and peak memory of a forward pass.
"""
