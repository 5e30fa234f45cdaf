"""The control plane: the state store, the object model, placement, and the controllers
that drive observed state toward desired state."""
