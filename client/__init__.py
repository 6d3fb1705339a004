"""headwater.client."""
