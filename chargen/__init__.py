"""chargen: run a character-level GPT exported to ONNX, with ONNX Runtime and numpy alone."""
