"""Models: the FCN nets (`fcn`), the paper's net surgery (`surgery`), the Caffe importer.

`build_model(name, num_classes, width)`, model files (`save_model`/`load_model`).
"""

from pipeline.models.fcn import (
    NET_CLASSES,
    FCN8s,
    FCN8sAtOnce,
    FCN16s,
    FCN32s,
    ModelFileError,
    build_model,
    load_model,
    save_model,
)

__all__ = [
    "NET_CLASSES",
    "FCN8s",
    "FCN8sAtOnce",
    "FCN16s",
    "FCN32s",
    "ModelFileError",
    "build_model",
    "load_model",
    "save_model",
]
