"""Prediction pipelines, one per modality, all writing through one result type.

Holds: ``slide`` (whole-slide image -> tiles -> encoder -> INSIGHT -> heatmap TIFF, scores,
overlay, GeoJSON, report) and ``features`` (precomputed feature files -> the same outputs).
May import: errors, atomic, ops, models, slide, encoders; never train/, evaluate/, cohort/, cli/.
"""
