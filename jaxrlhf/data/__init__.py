"""Data: tokenizers the project builds itself, built-in synthetic tasks, packing, pipelines.

Submodules are imported directly (``from jaxrlhf.data.tasks import ArithmeticTask``) so that
importing the package stays cheap.
"""
