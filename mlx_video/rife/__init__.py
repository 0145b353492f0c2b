"""RIFE frame interpolation: the IFNet flow network of Practical-RIFE v4.25."""

from .ifnet import IFNet, IFNetConfig, backward_warp, resize_bilinear

__all__ = ["IFNet", "IFNetConfig", "backward_warp", "resize_bilinear"]
