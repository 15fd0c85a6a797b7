"""Everything that knows TorchServe: context adapter, metrics sink, archive, server supervisor, nginx ingress.

With ``handlers/`` these are the only ``ts`` users, and here only inside functions, so guard imports
without TorchServe installed.
"""
