"""Reports: the data card and the model cards, written from the stages' own outputs."""
