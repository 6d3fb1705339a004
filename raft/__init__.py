"""headwater.raft."""
