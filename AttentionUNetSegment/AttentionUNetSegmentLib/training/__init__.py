"""Training a bundle: datasets, planning, augmentation, losses and the trainer."""
