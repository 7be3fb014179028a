"""layerskip_ext: LayerSkip early-exit training and self-speculative decoding."""
