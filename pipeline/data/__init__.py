"""Data: getting, generating, converting and serving the images and label maps.

Downloads with pinned checksums (`download`, `archives`), the seeded offline sample in the
real archives' layout (`sample`), SBD and COCO-to-VOC conversion (`sbd`, `coco_voc`), the
resize into shards (`preprocess`, `shards`), the paper's splits (`splits`, seg11valid), and
what training and evaluation read from the shards (`datasets`, `transforms`).
"""
