"""Everything that knows TorchServe: context adapter, archive, server supervisor (the only ``ts`` users)."""
