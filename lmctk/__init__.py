"""lmctk: linear mode connectivity and model merging for PyTorch."""
__version__ = "0.1.0"
