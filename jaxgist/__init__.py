"""jaxgist: CLIP-based fine-grained classification and captioning in JAX/Flax."""

__version__ = "0.1.0"
