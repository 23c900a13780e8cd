"""Scoring segmentations against reference labels (Dice, HD95, volume difference)."""
