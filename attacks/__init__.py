"""Attack plugins for fedsim, and the parts they are composed from. Plugins build on fedsim.api."""
