"""TorchServe handler files; installed as ``guard._assets.handlers`` (see guard/_assets)."""
