"""The attribution engine: the LoRA layout, per-record gradient capture and projection, exact
per-record gradients, influence scores, log-probs and targets. No TRL, no store."""
