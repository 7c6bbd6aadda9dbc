"""Rays to pixels: sampling, compositing (pure functions) and the stateful renderer."""

from .renderer import Renderer, RenderOutput
from .shading import NEEDS_NORMALS, SHADING_MODES, shade

__all__ = ["NEEDS_NORMALS", "SHADING_MODES", "RenderOutput", "Renderer", "shade"]
