"""Audio encoders and feature extraction for audio-driven video models."""
