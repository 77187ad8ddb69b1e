# kmsd: the key-management daemon. The package's modules, one responsibility each:
# crypto (the only hazmat importer), keys, store, kek, dispatch, server, config, cli.
"""kmsd holds the key-encryption key and answers protocol v1 on a Unix socket."""

__version__ = "0.1.0"
__all__ = ["__version__"]
