"""Shared building blocks of the stages: config, tracking, images, model loading."""
