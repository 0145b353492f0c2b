"""RIFE frame interpolation: the IFNet flow network of Practical-RIFE v4.25."""

from mlx_video.rife.ifnet import IFNet, IFNetConfig, backward_warp, resize_bilinear

__all__ = ["IFNet", "IFNetConfig", "backward_warp", "resize_bilinear"]
