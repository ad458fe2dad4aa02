"""Using a trained model: what to load (`target`), held-out loss (`evaluate`), text generation
(`generate`). Nothing here imports the training package."""
