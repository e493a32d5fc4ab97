"""Training from labelled cells: crops, augmentation, the training loop."""
