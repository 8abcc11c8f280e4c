"""Evaluation: retrieval metrics of image-caption score matrices."""
