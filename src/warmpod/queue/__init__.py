"""The queue: runs admitted, claimed by a node's workers, and their results read back."""
