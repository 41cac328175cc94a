"""The training engine shared by search and fine-tuning, and distillation losses."""
