"""Notebook 00's exercises: the shortcut and a planted bug for each."""

import numpy as np
import torch
import torch.nn.functional as F

from tutorial_lib.data.attributes import measure
from tutorial_lib.data.fashion_mnist import to_model_images
from tutorial_lib.exercises import data

from . import Exercise

NOTEBOOK = "00_setup_and_data"


def _zero_padding(images):  # pads with 0 (grey after scaling), not the background's -1
    return F.pad(torch.as_tensor(images).float() / 127.5 - 1, (2, 2, 2, 2), value=0.0)[:, None]


def _whole_frame_brightness(images):  # averages the whole frame, background included
    x = np.asarray(images)
    return (x / 255).mean(axis=(1, 2)), (x > 32).mean(axis=(1, 2))


def _measured(images):
    m = measure(images)
    return m["brightness"], m["size"]


EXERCISES = [
    Exercise(data.check_to_model_images, "to_model_images_from_scratch", shortcut=lambda images: to_model_images(images),
             bug=_zero_padding, hint="pad with -1"),
    Exercise(data.check_brightness_and_size, "brightness_and_size", shortcut=_measured,
             bug=_whole_frame_brightness, hint="garment's pixels only"),
]
