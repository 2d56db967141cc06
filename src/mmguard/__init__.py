"""mmguard: make image-text data unlearnable for vision-language models."""

__version__ = "0.1.0"
