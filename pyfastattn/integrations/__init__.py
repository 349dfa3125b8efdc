"""Integrations with other libraries. Each submodule imports its library only
when used, so pyfastattn itself never depends on them.

* :mod:`pyfastattn.integrations.transformers`: the ``"pyfastattn"`` attention
  implementation for Hugging Face transformers (``register()``).
"""
