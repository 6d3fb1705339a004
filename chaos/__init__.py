"""headwater.chaos."""
