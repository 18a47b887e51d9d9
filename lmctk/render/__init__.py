"""Rendering finished results: terminal curves (`curves`) and PNG plots (`plots`). Never computes."""

from lmctk.render.curves import terminal_curve
from lmctk.render.plots import heatmap_plot, line_plot

__all__ = ["heatmap_plot", "line_plot", "terminal_curve"]
