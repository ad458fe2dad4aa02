"""Hugging Face models on disk: folder files (`files`), built-in models (`embedded`), locating and
describing a model (`folder`), stream-loading with quantisation (`load`), exports (`export`)."""
