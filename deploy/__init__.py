"""Running a trained face model on photos: embedders (checkpoint, Paddle Inference, ONNX), face detection and
alignment, face-file inputs and the embedding gallery. Used by tools/, eval/ijb.py and model_test.py."""
