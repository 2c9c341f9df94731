"""One router per concern: prediction, model description, health, metrics, docs."""
