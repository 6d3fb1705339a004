"""headwater.node."""
