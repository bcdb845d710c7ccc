"""Image metrics: subject and scene similarity, edge agreement."""
