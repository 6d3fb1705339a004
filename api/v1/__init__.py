"""Generated stubs of the headwater.v1 contract, plus its reference batch codec (batch.py) and
partitioner (partitioner.py)."""
