"""The package version, in the bottom layer so that any module (runner's env.json) can read it without importing
the package facade (ssl_kit/__init__.py imports every layer)."""
__version__ = "0.1.0"
