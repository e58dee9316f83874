"""Evaluation: perplexity of a model or of a plan's exact weights (`perplexity`), metrics and plots.

Submodules are imported on use (`llmpq.evaluate.perplexity`), so importing the package stays cheap.
"""
