"""Training: segmentation losses and loss selection, Lightning tasks, fine-tuning strategies."""
