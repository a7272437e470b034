"""Evaluation: the paper's four metrics from a confusion matrix, and the evaluate stage.

`metrics` holds the confusion matrix and pixel accuracy / mean accuracy / mean IU /
frequency-weighted IU (FCN paper, section 5); `evaluate` scores every model on the val split at
original resolution; `tta` is flip/scale test-time augmentation.
"""
