"""The bnscope version: in ``bnscope.__version__``, ``bnscope --version`` and every JSON and
HTML report (``bnscope_version``). The package metadata reads it from here."""

__version__ = "0.1.0"
