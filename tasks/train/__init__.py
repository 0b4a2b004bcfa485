"""Training stage kinds (sft, reward_model, dpo) and the plain functions they share (loop, losses)."""
