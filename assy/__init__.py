"""assy: assemble pre-trained blocks into models, compare, adapt and federate them."""

__version__ = "0.1.0"
