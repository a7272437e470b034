"""FCN semantic segmentation pipeline: VOC 2012 + COCO 2017 -> FCN-32s/16s/8s -> metrics."""

__version__ = "0.1.0"
