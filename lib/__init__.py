"""The toolkit's shared machinery, one concept per module.

The scripts at the top level (`dataset.py`, `train.py`, `inference.py`, ...) are what users run;
`model.py`, `dataset.py` and `optim.py` hold the design (network, training data, optimiser). Everything
they share lives here, and modules here never import from the top level.
"""
