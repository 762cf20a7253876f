"""The ten Fashion-MNIST classes (Xiao, Rasul & Vollgraf, 2017), in label order.

A module of its own so that the loader (`fashion_mnist.py`) and the captions (`captions.py`) both
import it and neither imports the other.
"""

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
