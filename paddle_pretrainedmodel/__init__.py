"""Pretrained weights: convert arcface_torch backbones (convert_torch.py) and test them on .bin sets (model_test.py)."""
