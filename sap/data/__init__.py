"""Data layer: cases, image I/O, labels, preprocessing cache, synthetic cohorts, splits."""
