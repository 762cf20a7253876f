"""One-off: rewrite a pipeline saved before the diffusers layout (denoiser.safetensors +
text_encoder.safetensors, notebook 01's model) as `TextToImagePipeline.save_pretrained` writes it.

    python scripts/migrate_t2i_v1.py tutorial_lib/assets/tiny_t2i

The weights are unchanged; the training record (command, seconds, loss) moves into model_index.json.
"""

import sys
from pathlib import Path

from tutorial_lib.models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from tutorial_lib.pipeline import TextToImagePipeline
from tutorial_lib.text import WordEncoder, WordEncoderConfig
from tutorial_lib.vae.autoencoder import load_vae
from tutorial_lib.weights import WeightsError, load_model, weights_hash

folder = Path(sys.argv[1])
denoiser, extra = load_model(TinyTransformer, TinyTransformerConfig, folder / "denoiser.safetensors",
                             "tiny_transformer")
text_encoder, _ = load_model(WordEncoder, WordEncoderConfig, folder / "text_encoder.safetensors", "word_encoder")
vae = load_vae()
if extra.pop("vae_hash") != weights_hash(vae):
    raise WeightsError(f"{folder} was trained on another VAE's latents than the shipped one.")
TextToImagePipeline(denoiser, text_encoder, vae).save_pretrained(folder, **extra)
for old in ("denoiser.safetensors", "text_encoder.safetensors"):
    (folder / old).unlink()
print(f"{folder}: rewritten in the diffusers layout")
