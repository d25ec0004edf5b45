"""One rank's model: weights from `rank{N}.safetensors`, layers, attention backends, the plain step."""
