"""Model families and their checkpoints.

Holds: ``config`` (InsightConfig, saved with every model), ``insight`` (InsightModel, the INSIGHT
aggregator), ``checkpoints`` (one sniffer ``load_model(path)`` that returns the right model for a
file; other families register a loader with ``register_loader``).
May import: ``fastinsight.errors``, ``fastinsight.fileformat``, ``fastinsight.ops``; never
predict/, train/, cohort/, cli/.
"""
