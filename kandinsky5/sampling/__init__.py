"""Inference: the official sampler and generation pipeline (``pipeline``), prompt files (``prompts``) and video/image
files (``video_io``)."""
