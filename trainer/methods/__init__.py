"""One module per method; `METHOD_REGISTRY[name]` maps `method.name` to its class."""
from trainer.methods.base import METHOD_REGISTRY, Method, build_method, register_method

# Importing the modules registers them.
from trainer.methods import acl, deacl, rocl, simclr, supcon, supervised  # noqa: E402,F401

__all__ = ["METHOD_REGISTRY", "Method", "build_method", "register_method"]
