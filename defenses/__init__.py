"""Defense plugins for fedsim, applied in the client loop. Plugins build on fedsim.api."""
