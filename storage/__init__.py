"""headwater.storage."""
