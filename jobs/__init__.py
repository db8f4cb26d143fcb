"""Models (timm-based), training methods (MAE, DINO, distillation, fine-tuning, eval), the shared engine and checkpoints."""
