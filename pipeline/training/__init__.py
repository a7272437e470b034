"""Training: the FCN-32s -> FCN-16s -> FCN-8s fine-tuning loop and the sample's backbone.

`train` runs one stage of the cascade (solver, resume, DVCLive, DDP); `pretrain` trains the
sample profile's width-reduced VGG16 classifier that stands in for the ImageNet weights.
"""
