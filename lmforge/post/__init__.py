"""Post-training: chat data, supervised fine-tuning, preference tuning, distillation."""
