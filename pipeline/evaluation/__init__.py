"""Evaluation: the paper's four metrics from a confusion matrix, and the evaluate stage.

`metrics` holds the confusion matrix and pixel accuracy / mean accuracy / mean IU /
frequency-weighted IU (FCN paper, section 5); `score` is the one scoring function
(`evaluate_model`: a model's confusion matrix over a dataset at original resolution);
`evaluate` scores every model on the val split and writes its reports, formatted by `summary`;
`tta` is flip/scale test-time augmentation.
"""
