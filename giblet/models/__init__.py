"""Models trained on giblet stores."""
from giblet.models.autoencoder import (AutoencoderConfig, GibletAutoencoder, ModelSpec, count_parameters,
                                       hrf_kernel, prepare_batch)

__all__ = ["AutoencoderConfig", "GibletAutoencoder", "ModelSpec", "prepare_batch", "hrf_kernel", "count_parameters"]
