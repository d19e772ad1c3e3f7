"""Training, evaluation, data and checkpoint helpers shared by the six scripts."""
