"""fabric-align: KTO and SPIN alignment of Hugging Face causal LMs with Lightning Fabric."""

__version__ = "0.1.0"
