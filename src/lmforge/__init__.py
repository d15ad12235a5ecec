"""lmforge: one checked pipeline for a language model's whole life."""

__version__ = "0.1.0"
