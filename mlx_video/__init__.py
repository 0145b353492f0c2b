"""mlx-video: local video generation on Apple Silicon with MLX."""

__version__ = "0.1.0"
