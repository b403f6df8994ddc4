"""The package's version, in a module of its own: the modules that stamp it on model files, graphs and answers
import it from here, not from the package's ``__init__`` (which imports them lazily: a cycle)."""

__version__ = "0.1.0"
