"""Images: reading, grids, faces and crops, ControlNet annotators, the prep manifest."""
