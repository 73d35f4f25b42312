"""The package version, the one place it is written: pyproject.toml reads it ([tool.setuptools.dynamic]), and
`ssl-kit --version`, env.json of every run and `ssl_kit.__version__` import it from here. A bottom-layer module
without imports, so reading it costs nothing."""
__version__ = "0.1.0"
