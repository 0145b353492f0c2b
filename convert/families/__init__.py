"""One converter per model family: its layouts, signatures, configuration and plan (see mlx_video.families)."""
