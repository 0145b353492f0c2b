"""Genmo Mochi 1 preview: the AsymmDiT transformer and the AsymmVAE, channels-last."""
