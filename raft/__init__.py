"""headwater.raft: the metadata quorum (``metadata``: the pure state machine; ``commands``: its log)."""
