"""Model patching: the architecture registry, the SSA attention function and the convert / unload lifecycle."""
