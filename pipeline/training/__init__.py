"""Training: the FCN-32s -> FCN-16s -> FCN-8s fine-tuning loop and the sample's backbone.

- `train`: one stage of the cascade, read top to bottom as the recipe;
- `start`: the model and optimiser a stage starts from (VGG16, the previous stage, a resume);
- `step`: one optimiser step (forward/backward, accumulation, loss read-back);
- `solver`: SGD groups, the learning rate (`LrSchedule`), the budget, loss normalisation;
- `validation`: training-time scoring through `pipeline.evaluation.score.evaluate_model`;
- `resume`: the inputs fingerprint, the checkpoint store and cadence, RNG capture;
- `live`: DVCLive points and their replay after a resume;
- `distributed`: process lifetime, the stage lock, the DDP process group, the epoch sampler;
- `launch`: the stage's files, the torchrun relaunch, the call from `stages/train.py`;
- `pretrain`: the sample profile's width-reduced VGG16 classifier, the stand-in for ImageNet.
"""
