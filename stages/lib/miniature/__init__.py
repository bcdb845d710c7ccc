"""The miniature: a procedural world of faces, a tiny SD-architecture model, its pretraining and attribute reader."""
