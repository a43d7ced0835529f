//! cogvx latent/prompt cache (in progress).
