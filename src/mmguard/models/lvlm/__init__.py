"""Generative vision-language models (LVLMs): one adapter contract, several families."""
