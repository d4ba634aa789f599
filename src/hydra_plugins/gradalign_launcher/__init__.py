"""gradalign's Hydra launcher plugin (Hydra finds plugins only under ``hydra_plugins``)."""
