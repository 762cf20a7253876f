"""Lets diffusers.DiffusionPipeline.from_pretrained(this folder) build the pipeline: needs `pip install tutorial_lib`."""
from tutorial_lib.pipeline import PipelineComponent, TextToImagePipeline  # noqa: F401
