"""Reports: the data card, the model cards and the colour overlays they show."""
