//! # cogvx-trainer: the training loop (work in progress).
