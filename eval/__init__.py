"""Evaluation: .bin verification sets (InsightFace protocol), IJB-B/C TAR@FAR, the training callback."""
